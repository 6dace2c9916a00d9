"""method=multi: K independent fits of a base method, their members pooled with equal weight."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest

from bnn_bench.config import build, validate
from bnn_bench.errors import UserError
from bnn_bench.evaluation import EvalInputs
from bnn_bench.methods.base import RunContext
from bnn_bench.methods.multi import Multi, fit_key
from bnn_bench.models import build_model
from tests.conftest import compose_cfg, config_choices, tiny
from tests.methods.test_contract import TINY_METHOD

pytestmark = pytest.mark.e2e

# the contract's tiny budget of multi, without its number of fits
TINY = [o for o in TINY_METHOD["multi"] if not o.startswith("method.fits=")]


def _setup(*extra: str):
    cfg = compose_cfg(*tiny("multi"), *TINY, *extra)
    validate(cfg)
    data = build(cfg.dataset, "dataset").load()
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(module, data.spec, "mlp", cfg.eval.batch_size)
    return data, model, build(cfg.method, "method")


def _probs(method, key, posterior, x) -> np.ndarray:
    return np.exp(np.concatenate(list(method.member_log_probs(key, posterior, x))))  # (S, N, C)


def test_one_fit_is_the_base_run():
    """fits=1 gives exactly the base's members: fit 0 is the base fitted from the same key."""
    data, model, multi = _setup("method.fits=1")
    x, key, k_members = data.test.x[:50], jax.random.key(3), jax.random.key(4)
    ctx = RunContext()
    alone = _probs(multi.base, k_members, multi.base.fit(key, model, data), x)
    pooled = _probs(multi, k_members, multi.fit(key, model, data, ctx), x)
    assert pooled.shape == alone.shape == (3, 50, data.spec.num_classes)
    np.testing.assert_array_equal(pooled, alone)
    assert ctx.meter.counts["samples"] == 3


def test_two_fits_pool_two_distinct_fits_with_equal_weight():
    """The predictive of 2 fits is the mean of the two fits' predictives (each from its own
    key, fit 1's the same whatever the number of fits), and the two differ."""
    data, model, multi = _setup("method.fits=2")
    x, key, k_members = data.test.x[:50], jax.random.key(3), jax.random.key(4)
    ctx = RunContext()
    posterior = multi.fit(key, model, data, ctx)
    summary = multi.predict(k_members, posterior, EvalInputs({"test": x}))["test"]
    each = [
        _probs(multi.base, fit_key(k_members, k), multi.base.fit(fit_key(key, k), model, data), x)
        for k in (0, 1)
    ]
    assert int(summary.count) == 6 and ctx.meter.counts["samples"] == 6
    np.testing.assert_allclose(summary.mean(), (each[0].mean(0) + each[1].mean(0)) / 2, atol=1e-6)
    assert np.abs(each[0].mean(0) - each[1].mean(0)).max() > 1e-3  # two distinct fits
    # the fits' MAP networks differ too: each trained its own
    maps = [fit.params for fit in posterior.fits]
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(*map(jax.tree.leaves, maps), strict=True))


def test_plan_sums_the_base():
    data, model, multi = _setup("method.fits=3")
    one, three = multi.base.plan(model, data), multi.plan(model, data)
    assert (three.steps, three.grad_evals, three.members) == (
        3 * one.steps,
        3 * one.grad_evals,
        3 * one.members,
    )
    assert (three.batch_size, three.networks) == (one.batch_size, one.networks)


def test_the_fits_report_their_mean_and_keep_their_own_checkpoints(tmp_path):
    from bnn_bench.checkpoint import Session
    from bnn_bench.data import Split

    data, model, multi = _setup("method.fits=2")
    with Session(tmp_path / "ckpt", every=1) as session:
        posterior = multi.fit(jax.random.key(0), model, data, RunContext(checkpoints=session))
    # fit 0 keeps the base's loop names (it is the base run), fit 1 its own
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        "trainer",
        "swag",
        "trainer.fit1",
        "swag.fit1",
    }
    sets = {"test": Split(data.test.x[:50], data.test.y[:50])}
    report = multi.report(jax.random.key(1), posterior, sets, 10)
    each = [
        multi.base.report(fit_key(jax.random.key(1), k), fit, sets, 10)
        for k, fit in enumerate(posterior.fits)
    ]
    assert report["map/test/acc"] == pytest.approx(
        (each[0]["map/test/acc"] + each[1]["map/test/acc"]) / 2
    )
    assert posterior.info["multi/fits"] == 2.0


def test_refusals_name_the_key():
    with pytest.raises(UserError, match="method.fits must be >= 1"):
        _setup("method.fits=0")
    _, _, multi = _setup("method.fits=1")
    from_map = copy.copy(multi.base)
    object.__setattr__(from_map, "init_from", "outputs/a_map_run")  # past SWAG's own check
    with pytest.raises(UserError, match="method.base.init_from: every fit would start"):
        Multi(base=from_map)


@pytest.mark.parametrize("choice", config_choices("method/base"))
def test_every_base_is_the_method_of_that_name(choice):
    """method/base=<c> composes conf/method/<c>.yaml itself: method.base of method=multi
    equals method=<c>'s node, its nested groups included."""
    multi = compose_cfg("method=multi", f"method/base={choice}")
    validate(multi)
    assert multi.method.base == compose_cfg(f"method={choice}").method
