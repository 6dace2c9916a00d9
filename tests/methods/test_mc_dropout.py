"""``mc_dropout``: members are exact dropout passes; their mean converges to the closed form."""

from __future__ import annotations

import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.data import Spec
from bnn_bench.errors import UserError
from bnn_bench.methods.point.map import PointPosterior
from bnn_bench.methods.posthoc.mc_dropout import dropout, dropout_rates, mc_dropout_logits
from bnn_bench.models import Model, build_model
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg, tiny

pytestmark = pytest.mark.e2e


class InputDropoutLinear(nn.Module):
    """Dropout on the flattened input, then one dense layer: E[p] is a finite sum."""

    num_classes: int
    rate: float

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dropout(self.rate, deterministic=not train)(x.reshape((x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)


TOY = Spec("toy", (2, 2, 1), 3, ("a", "b", "c"), (0.0,), (1.0,))


def _method(*overrides):
    return build(compose_cfg(*tiny("mc_dropout"), *overrides).method, "method")


def test_dropout_is_flax_dropout_in_training_mode():
    x = jax.random.normal(jax.random.key(1), (5, 4, 4, 3))
    key = jax.random.key(2)
    for rate, dims in ((0.3, ()), (0.5, (1, 2)), (0.0, ())):
        ref = nn.Dropout(rate, broadcast_dims=dims).apply({}, x, deterministic=False, rng=key)
        np.testing.assert_array_equal(dropout(key, x, rate, dims), ref)


def test_members_mean_converges_to_the_exact_expectation():
    """One dense layer after input dropout: every member is one of the 2^4 masked
    softmaxes, and the members' mean tends to their probability-weighted sum."""
    rate, s = 0.3, 4000
    model = Model(InputDropoutLinear(3, rate), TOY, "toy", batch_size=7)
    params, state = model.init(jax.random.key(0))
    params = jax.tree.map(lambda a: 3.0 * a + 0.5, params)  # a non-trivial softmax
    x = jax.random.randint(jax.random.key(1), (10, 2, 2, 1), 0, 256).astype(jnp.uint8)
    h = np.asarray(TOY.preprocess(x), np.float64).reshape(10, 4)
    w = np.asarray(params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(params["Dense_0"]["bias"], np.float64)

    masks = np.array(list(itertools.product([0, 1], repeat=4)), np.float64)  # (16, 4)
    weight = np.prod(np.where(masks == 1, 1 - rate, rate), axis=1)  # (16,)
    z = np.einsum("md,nd,dc->mnc", masks, h, w) / (1 - rate) + b  # (16, N, C)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("m,mnc->nc", weight, p)

    method = _method(f"method.members={s}", "method.members_per_chunk=1000")
    post = PointPosterior(model=model, params=params, state=state)
    probs = np.exp(
        np.concatenate(list(method.member_log_probs(jax.random.key(3), post, x)))
    )  # (S, N, C)
    assert probs.shape == (s, 10, 3)
    # each member of each input is one of the 16 masked networks
    dist = np.abs(probs[:, :, None, :] - p.transpose(1, 0, 2)[None]).max(-1)  # (S, N, 16)
    assert dist.min(-1).max() < 1e-5
    se = probs.std(0) / np.sqrt(s)
    assert (np.abs(probs.mean(0) - expected) <= 4.5 * se + 1e-6).all()
    # and the logits' mean tends to the dropout-free logits (inverted dropout keeps the mean)
    logits = np.asarray(
        mc_dropout_logits(model, params, state, x, jax.random.split(jax.random.key(4), s))
    )
    se = logits.std(0) / np.sqrt(s)
    assert (np.abs(logits.mean(0) - (h @ w + b)) <= 4.5 * se + 1e-5).all()
    # distinct passes differ; the same key gives the same members
    assert np.abs(probs[0] - probs[1]).max() > 1e-3
    again = np.exp(np.concatenate(list(method.member_log_probs(jax.random.key(3), post, x))))
    np.testing.assert_array_equal(again, probs)


def test_rate_zero_members_equal_the_deterministic_network_batchnorm_in_eval_mode():
    """LeNet with BatchNorm and dropout layers at rate 0: every member is the network's
    evaluation-mode softmax, with its running statistics (not the batch's)."""
    cfg = compose_cfg(
        *[o for o in TINY if not o.startswith("model")],
        "model=lenet",
        "model.norm=batchnorm",
        "method=mc_dropout",
    )
    data = build(cfg.dataset, "dataset").load()
    model = build_model(build(cfg.model, "model", num_classes=10), data.spec, "lenet", 16)
    params, state = model.init(jax.random.key(0))
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    state = jax.tree.unflatten(  # running statistics far from any batch's
        tree,
        [jnp.abs(jax.random.normal(k, a.shape)) + 0.5 for k, a in zip(keys, leaves, strict=True)],
    )
    assert dropout_rates(model) == [0.0] * 4
    x = data.test.x[:40]
    post = PointPosterior(model=model, params=params, state=state)
    method = build(cfg.method, "method")
    probs = np.exp(np.concatenate(list(method.member_log_probs(jax.random.key(2), post, x))))
    assert probs.shape == (16, 40, 10)
    ref = model.probs(params, state, x)
    np.testing.assert_allclose(probs, np.broadcast_to(ref, probs.shape), atol=1e-6)
    batch_stats = model.apply(params, state, x, train=True)[0]  # BN on the batch: differs
    assert np.abs(jax.nn.softmax(batch_stats) - ref).max() > 1e-3


def test_default_models_have_no_dropout_and_mc_dropout_refuses_them():
    """mlp and cnn at rate 0 have no dropout layer (the same networks as before the key);
    lenet's stay at rate 0. All three are refused, naming the key, before training."""
    for name, rates in (("mlp", []), ("cnn", []), ("lenet", [0.0] * 4)):
        cfg = compose_cfg(*[o for o in TINY if not o.startswith("model")], f"model={name}")
        data = build(cfg.dataset, "dataset").load()
        model = build_model(build(cfg.model, "model", num_classes=10), data.spec, name)
        assert dropout_rates(model) == rates
        with pytest.raises(UserError, match=r"model\.dropout_rate=0\.2"):
            _method().fit(jax.random.key(0), model, data)


@pytest.mark.parametrize("name,count", [("mlp", 1), ("cnn", 3), ("lenet", 4)])
def test_dropout_rate_adds_dropout_used_in_training_only(name, count):
    cfg = compose_cfg(
        *[o for o in TINY if not o.startswith("model")], f"model={name}", "model.dropout_rate=0.5"
    )
    data = build(cfg.dataset, "dataset").load()
    model = build_model(build(cfg.model, "model", num_classes=10), data.spec, name)
    assert dropout_rates(model) == [0.5] * count
    params, state = model.init(jax.random.key(0))
    x = data.test.x[:8]
    a = model.apply(params, state, x, train=True, key=jax.random.key(1))[0]
    b = model.apply(params, state, x, train=True, key=jax.random.key(2))[0]
    assert np.abs(np.asarray(a - b)).max() > 1e-4
    eval_a = model.apply(params, state, x)[0]  # evaluation mode: no dropout, deterministic
    np.testing.assert_array_equal(eval_a, model.apply(params, state, x, key=jax.random.key(1))[0])


def test_run_from_a_dropout_map_run(tmp_path):
    """``init_from`` a `map` run of the same dropout MLP: the dropout-off metrics are that
    run's, and the MC average differs from it."""
    small = [*TINY, "model.dropout_rate=0.3"]
    map_dir = tmp_path / "map"
    mapped = run(compose_cfg(*small), map_dir)
    metrics = run(
        compose_cfg(*small, "method=mc_dropout", f"method.init_from={map_dir}"), tmp_path / "mc"
    )
    assert metrics["map/test/acc"] == pytest.approx(mapped["test/acc"])
    assert metrics["map/test/nll"] == pytest.approx(mapped["test/nll"], rel=1e-4)
    assert metrics["test/nll"] != pytest.approx(mapped["test/nll"], rel=1e-4)
    saved = json.loads((tmp_path / "mc" / "metrics.json").read_text())
    assert saved["cost/samples"] == 16  # S = members


def test_tu_preset_is_torch_uncertaintys_lenet():
    """LeNet without BatchNorm, dropout 0.4, 16 passes; the trainer recipe is pinned in
    tests/test_presets.py."""
    cfg = compose_cfg("experiment=tu_mc_dropout")
    assert cfg.model._target_.endswith("LeNet") and cfg.model.dropout_rate == 0.4
    assert cfg.model.norm == "none"
    method = build(cfg.method, "method")
    assert type(method).__name__ == "MCDropout" and method.members == 16
