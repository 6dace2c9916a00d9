"""The residual networks against their references: ResNet-20(-FRN) against the NeurIPS
2021 BDL competition's haiku models (parameter counts, and the forward pass on the same
weights), WideResNet's parameter count against one counted layer by layer from
uncertainty-baselines' ``wide_resnet`` and the published totals."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.models import num_params
from bnn_bench.models.resnet import ResNet, ResNetFRN, WideResNet
from tests.conftest import compose_cfg
from tests.models import bdl_kit_resnet as ref

pytestmark = pytest.mark.unit


def _params(module, shape):
    """Shapes of a flax module's params for one input of ``shape`` (no compute)."""
    x = jnp.zeros((1, *shape))
    return jax.eval_shape(lambda k: module.init(k, x), jax.random.key(0))["params"]


def _haiku_params(make_fn, shape, classes=10):
    """The haiku model and its initial (params, state) for inputs of ``shape``."""
    f = hk.transform_with_state(make_fn({"num_classes": classes}))
    return f, *jax.jit(f.init, static_argnums=2)(jax.random.key(0), jnp.zeros((2, *shape)), True)


@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1)])
@pytest.mark.parametrize(
    "choice,make_fn",
    [
        ("resnet20_frn", ref.make_resnet20_frn_swish_fn),
        ("resnet20", ref.make_resnet20_fn),
    ],
)
def test_resnet20_parameter_count_equals_the_haiku_reference(choice, make_fn, shape):
    module = build(compose_cfg(f"model={choice}").model, "model", num_classes=10)
    # The reference's fixed 8x8 pool cannot take 28x28: count its 32x32 model with as
    # many input channels (the only parameters that depend on the input).
    f = hk.transform_with_state(make_fn({"num_classes": 10}))
    x = jnp.zeros((1, 32, 32, shape[-1]))
    hk_params, _ = jax.eval_shape(lambda k: f.init(k, x, True), jax.random.key(0))
    expected = num_params(hk_params)
    assert num_params(_params(module, shape)) == expected


def _to_flax(hk_params):
    """haiku's ResNet params -> this module's, by name: ``conv2_d[_i]`` -> ``Conv_i``,
    ``frn[_i]`` -> ``FilterResponseNorm_i`` ((1, 1, 1, C) -> (C,)), ``linear`` -> ``Dense_0``."""
    out = {}
    for name, leaves in hk_params.items():
        base, i = (name, "0") if not name[-1].isdigit() else name.rsplit("_", 1)
        if base == "conv2_d":
            out[f"Conv_{i}"] = {"kernel": leaves["w"], "bias": leaves["b"]}
        elif base == "frn":
            out[f"FilterResponseNorm_{i}"] = {k: v.reshape(-1) for k, v in leaves.items()}
        elif base == "linear":
            out[f"Dense_{i}"] = {"kernel": leaves["w"], "bias": leaves["b"]}
        else:
            raise AssertionError(f"unmapped haiku module {name}")
    return out


def test_resnet20_frn_forward_equals_the_competition_haiku_model():
    """Same weights (randomised, so FRN's gamma, beta, tau are not their 1, 0, 0 init),
    same CIFAR-shaped inputs: the logits agree within float32 tolerance."""
    f, hk_params, hk_state = _haiku_params(ref.make_resnet20_frn_swish_fn, (32, 32, 3))
    leaves, tree = jax.tree.flatten(hk_params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    hk_params = jax.tree.unflatten(tree, noisy)
    x = jax.random.normal(jax.random.key(2), (3, 32, 32, 3))
    expected, _ = jax.jit(f.apply, static_argnums=4)(hk_params, hk_state, None, x, False)

    module = ResNetFRN(num_classes=10)
    params = _to_flax(hk_params)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, _params(module, x.shape[1:]))
    got = jax.jit(module.apply)({"params": params}, x)
    assert np.abs(np.asarray(expected)).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _wrn_count(depth: int, k: int, channels: int = 3, classes: int = 10) -> int:
    """uncertainty-baselines' wide_resnet(version=2), counted layer by layer: 3x3 convs
    without bias, BN (scale, offset) before each conv of a block, a 1x1 projection where
    the width changes, a final BN and a dense layer with bias."""
    n = (depth - 4) // 6
    total, c_in = 9 * channels * 16, 16
    for f in (16 * k, 32 * k, 64 * k):
        for b in range(n):
            cin = c_in if b == 0 else f
            total += 2 * cin + 9 * cin * f + 2 * f + 9 * f * f
            total += cin * f if cin != f else 0
        c_in = f
    return total + 2 * c_in + c_in * classes + classes


@pytest.mark.parametrize(
    "choice,depth,width,published_m", [("wrn", 28, 10, 36.5), ("wrn16_4", 16, 4, 2.7)]
)
def test_wrn_parameter_count_equals_the_reference(choice, depth, width, published_m):
    cfg = compose_cfg(f"model={choice}").model
    assert (cfg.depth, cfg.width) == (depth, width)
    count = num_params(_params(build(cfg, "model", num_classes=10), (32, 32, 3)))
    assert count == _wrn_count(depth, width)
    assert round(count / 1e6, 1) == published_m  # Zagoruyko & Komodakis 2016, Table 1


def test_resnets_take_fashion_mnist_and_cifar_inputs_and_refuse_bad_depths():
    for shape in [(28, 28, 1), (32, 32, 3)]:
        x = jnp.ones((2, *shape))
        for module in (ResNetFRN(10, width=4), ResNet(10, width=4), WideResNet(10, 10, 1)):
            out = jax.eval_shape(lambda x, m=module: m.init_with_output(jax.random.key(0), x)[0], x)
            assert out.shape == (2, 10)
    with pytest.raises(ValueError, match="model.depth must be 6n\\+2"):
        _params(ResNetFRN(10, depth=21), (32, 32, 3))
    with pytest.raises(ValueError, match="model.depth must be 6n\\+4"):
        _params(WideResNet(10, depth=27), (32, 32, 3))
