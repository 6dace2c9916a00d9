"""Every model on every dataset shape (with and without resize); the input pipeline
against TensorFlow's resize; clear errors for inputs a model cannot take."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.data import Spec
from bnn_bench.errors import UserError
from bnn_bench.models import build_model, num_params
from bnn_bench.models.lenet import adaptive_avg_pool
from tests.conftest import compose_cfg, config_choices

pytestmark = pytest.mark.unit


def spec_of(name: str, resize=None) -> Spec:
    """The spec of ``conf/dataset/<name>.yaml``, without reading its data."""
    d = compose_cfg(f"dataset={name}").dataset
    names = tuple(d.class_names)
    return Spec(name, tuple(d.shape), len(names), names, tuple(d.mean), tuple(d.std), resize)


CASES = [
    ("mnist", None),
    ("fashion_mnist", None),
    ("cifar10", None),
    ("cifar10", (112, 112)),
    ("fashion_mnist", (32, 32)),
]


@pytest.mark.parametrize("model_name", config_choices("model"))
@pytest.mark.parametrize("dataset,resize", CASES)
def test_forward_gives_batch_by_classes(model_name, dataset, resize):
    cfg = compose_cfg(f"model={model_name}")
    spec = spec_of(dataset, resize)
    module = build(cfg.model, "model", num_classes=spec.num_classes)
    model = build_model(module, spec, model_name)
    params, state = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((3, *spec.shape), jnp.uint8)
    out = jax.eval_shape(lambda p, s, x: model.apply(p, s, x)[0], params, state, x)
    assert out.shape == (3, spec.num_classes)


def test_forward_runs_and_batched_logits_match():
    spec = spec_of("fashion_mnist")
    cfg = compose_cfg("model=lenet", "model.norm=batchnorm")
    model = build_model(build(cfg.model, "model", num_classes=10), spec, "lenet", batch_size=7)
    params, state = model.init(jax.random.key(0))
    assert "batch_stats" in state and model.has_batch_norm
    x = jax.random.randint(jax.random.key(1), (20, 28, 28, 1), 0, 256).astype(jnp.uint8)
    whole = model.apply(params, state, x)[0]
    np.testing.assert_allclose(model.logits(params, state, x), whole, rtol=1e-5, atol=1e-5)
    logits, new_state = model.apply(params, state, x, train=True)
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, new_state, state))


def test_mlp_is_the_blackjax_784_500_10():
    cfg = compose_cfg("model=mlp")
    model = build_model(build(cfg.model, "model", num_classes=10), spec_of("mnist"), "mlp")
    params, _ = model.init(jax.random.key(0))
    assert num_params(params) == 784 * 500 + 500 + 500 * 10 + 10


def test_cnn_is_the_laplax_tutorial_cnn():
    cfg = compose_cfg("model=cnn")
    model = build_model(build(cfg.model, "model", num_classes=10), spec_of("mnist"), "cnn")
    params, _ = model.init(jax.random.key(0))
    convs = (3 * 3 * 1 * 32 + 32) + (3 * 3 * 32 * 32 + 32) + (3 * 3 * 32 * 64 + 64)
    assert num_params(params) == convs + 64 * 10 + 10  # 1x1x64 features on 28x28


def test_mobilenet_parameter_count_matches_haiku_layout():
    """Without BN every conv has a bias (haiku's with_bias = not use_bn)."""
    cfg = compose_cfg("model=mobilenet", "model.use_bn=false")
    model = build_model(build(cfg.model, "model", num_classes=10), spec_of("cifar10"), "mobilenet")
    params, _ = model.init(jax.random.key(0))
    channels = (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
    expected, c_in = 3 * 3 * 3 * 32 + 32, 32
    for c in channels:
        expected += 3 * 3 * c_in + c_in + c_in * c + c  # depthwise + pointwise, with biases
        c_in = c
    expected += 1024 * 10 + 10
    assert num_params(params) == expected


def test_resize_matches_tensorflow_bilinear_with_aspect_ratio():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 20, 30, 3), dtype=np.uint8)
    spec = Spec("t", (20, 30, 3), 2, ("a", "b"), (0.0,), (1.0,), resize=(45, 45))
    assert spec.input_shape == (30, 45, 3)  # scale min(45/20, 45/30) = 1.5
    ours = np.asarray(spec.preprocess(jnp.asarray(x)))
    ref = tf.image.resize(
        x.astype(np.float32) / 255.0, (45, 45), method="bilinear", preserve_aspect_ratio=True
    ).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_normalisation_per_channel():
    spec = Spec("t", (2, 2, 3), 2, ("a", "b"), (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    x = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
    np.testing.assert_allclose(spec.preprocess(x)[0, 0, 0], [1.0, 3.0, 1.0], rtol=1e-6)


def test_adaptive_avg_pool_matches_torch_windows():
    x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
    out = adaptive_avg_pool(x, (4, 4))
    # torch's windows for 5 -> 4: [0,2), [1,3), [2,4), [3,5)
    ref = np.stack(
        [
            np.stack([np.asarray(x)[:, r : r + 2, c : c + 2].mean((1, 2)) for c in range(4)], 1)
            for r in range(4)
        ],
        1,
    )
    np.testing.assert_allclose(out, ref, rtol=1e-6)


@pytest.mark.parametrize("model_name", ["cnn", "lenet"])
def test_too_small_resize_is_one_clear_error(model_name):
    cfg = compose_cfg(f"model={model_name}")
    spec = spec_of("mnist", (6, 6))
    with pytest.raises(UserError, match=r"cannot take mnist inputs of shape \(6, 6, 1\)"):
        build_model(build(cfg.model, "model", num_classes=10), spec, model_name)
