"""Sampler diagnostics: rank-normalised split-R̂ and bulk/tail ESS against ArviZ on fixed
chains (mixed, one chain, few draws, slow, stuck, drifting, unequal spread); the trace
folded in a scan; the traces plot; an SGLD run's test/rhat, test/ess, test/ess_tail and
traces.npy against its saved samples."""

from __future__ import annotations

import json
import math
import warnings

import jax
import jax.numpy as jnp
import matplotlib.image as mpimg
import numpy as np
import pytest
from flax import serialization

from bnn_bench.config import build
from bnn_bench.evaluation import diagnostics as D
from bnn_bench.models import build_model
from bnn_bench.reporting import plots
from bnn_bench.run import run
from tests.conftest import compose_cfg, tiny

pytestmark = pytest.mark.unit

with warnings.catch_warnings():  # ArviZ announces its refactor on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az  # the peer implementation (a test dependency: pyproject's dev extra)


def ar1(chains: int, samples: int, rho: float, q: int = 3, seed: int = 0) -> np.ndarray:
    """(chains, samples, q) stationary AR(1) chains of unit marginal variance."""
    rng = np.random.default_rng(seed)
    x = np.empty((chains, samples, q))
    x[:, 0] = rng.standard_normal((chains, q))
    for t in range(1, samples):
        x[:, t] = rho * x[:, t - 1] + math.sqrt(1 - rho**2) * rng.standard_normal((chains, q))
    return x


def arviz(x: np.ndarray) -> dict[str, np.ndarray]:
    """ArviZ's rank R̂, bulk and tail ESS of each quantity of (chains, S, Q) draws."""
    per_q = [x[..., q] for q in range(x.shape[-1])]
    return {
        "rhat": np.array([float(az.rhat(d, method="rank")) for d in per_q]),
        "ess": np.array([float(az.ess(d, method="bulk")) for d in per_q]),
        "ess_tail": np.array([float(az.ess(d, method="tail")) for d in per_q]),
    }


def ours(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"rhat": D.rank_rhat(x), "ess": D.bulk_ess(x), "ess_tail": D.tail_ess(x)}


# (chains, S, ρ): an odd S (the middle draw is dropped when splitting), few draws, slow
# mixing, many chains
SHAPES = [(4, 301, 0.5), (2, 7, 0.3), (8, 50, 0.95), (3, 1000, 0.0)]


@pytest.mark.parametrize("chains,samples,rho", SHAPES)
def test_rhat_and_ess_equal_arviz(chains, samples, rho):
    x = ar1(chains, samples, rho, seed=samples)
    want, got = arviz(x), ours(x)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)
    metrics = D.chain_metrics(x)
    assert metrics["rhat"] == pytest.approx(want["rhat"].max(), rel=1e-6)
    assert metrics["ess"] == pytest.approx(want["ess"].min(), rel=1e-6)
    assert metrics["ess_tail"] == pytest.approx(want["ess_tail"].min(), rel=1e-6)


def test_one_chain_has_ess_and_no_rhat():
    x = ar1(1, 200, 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = arviz(x)  # ArviZ's R̂ of one chain is NaN too (it logs a shape warning)
    assert np.all(np.isnan(want["rhat"]))
    metrics = D.chain_metrics(x)
    assert math.isnan(metrics["rhat"])  # null in metrics.json, as before
    # the halves of the one chain are compared for ESS
    assert metrics["ess"] == pytest.approx(want["ess"].min(), rel=1e-6)
    assert metrics["ess_tail"] == pytest.approx(want["ess_tail"].min(), rel=1e-6)


def test_ess_counts_independent_and_correlated_draws():
    iid = D.bulk_ess(ar1(4, 500, 0.0, q=20))
    assert 0.85 * 2000 < np.median(iid) < 1.15 * 2000
    # AR(1): ESS ≈ N (1 - ρ) / (1 + ρ) = 2000 · 0.1 / 1.9 ≈ 105
    correlated = D.bulk_ess(ar1(4, 500, 0.9, q=20))
    assert 60 < np.median(correlated) < 160


def test_rhat_is_large_for_stuck_and_drifting_chains():
    stuck = ar1(4, 200, 0.5) + np.array([0.0, 5.0, 10.0, 15.0])[:, None, None]
    np.testing.assert_allclose(D.rank_rhat(stuck), arviz(stuck)["rhat"], rtol=1e-6)
    assert np.all(D.rank_rhat(stuck) > 2) and D.chain_metrics(stuck)["rhat"] > 2
    # chains that never move, each at its own value: R̂ ≫ 1 (ArviZ's too)
    frozen = np.broadcast_to(np.array([0.0, 1.0, 2.0, 3.0])[:, None, None], (4, 100, 1))
    np.testing.assert_allclose(D.rank_rhat(frozen), arviz(frozen)["rhat"], rtol=1e-6)
    assert D.chain_metrics(frozen)["rhat"] > 1e3
    # a drift inside each chain shows in split-R̂ even when the chains agree
    drift = ar1(4, 200, 0.5) + np.linspace(0, 6, 200)[None, :, None]
    np.testing.assert_allclose(D.rank_rhat(drift), arviz(drift)["rhat"], rtol=1e-6)
    assert np.all(D.rank_rhat(drift) > 1.3)


def test_folding_sees_chains_of_equal_centre_but_unequal_spread():
    """The tail R̂ (draws folded about the median) catches what the bulk R̂ cannot."""
    x = ar1(4, 400, 0.0, seed=1) * np.array([1.0, 1.0, 1.0, 4.0])[:, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = np.array([float(az.rhat(x[..., q], method="split")) for q in range(3)])
    assert np.all(split < 1.05)  # the classic split-R̂ sees nothing wrong
    assert np.all(D.rank_rhat(x) > 1.1)
    np.testing.assert_allclose(D.rank_rhat(x), arviz(x)["rhat"], rtol=1e-6)


def test_constant_quantities_are_left_out():
    x = ar1(2, 100, 0.3, q=2)
    x[..., 1] = -3.0  # a quantity that never changes (a saturated member's log-probability)
    metrics = D.chain_metrics(x)
    assert metrics["ess"] == pytest.approx(float(D.bulk_ess(x[..., 0])), 1e-6)
    assert metrics["ess_tail"] == pytest.approx(float(D.tail_ess(x[..., 0])), 1e-6)
    assert metrics["rhat"] == pytest.approx(float(D.rank_rhat(x[..., 0])), 1e-6)


def test_too_few_draws_give_no_numbers():
    metrics = D.chain_metrics(ar1(4, 3, 0.3))  # ArviZ needs 4 draws per chain too
    assert all(math.isnan(v) for v in metrics.values())


def test_trace_folds_each_sample_inside_a_scan():
    chains, samples, n, c, k = 3, 7, 20, 4, 2
    logits = jax.random.normal(jax.random.key(0), (samples, chains, n, c))
    probs = jax.nn.softmax(logits, -1)
    log_probs = jax.nn.log_softmax(logits, -1)
    labels = jax.random.randint(jax.random.key(1), (n,), 0, c)

    def body(trace, p):
        return trace.add(D.sample_quantities(p, labels, jnp.arange(k))), None

    empty = D.ChainTrace.empty(samples - 2, chains, 1 + k * c)  # room for 5: two are dropped
    trace, _ = jax.jit(lambda t, p: jax.lax.scan(body, t, p))(empty, log_probs)
    draws = trace.draws()
    assert draws.shape == (chains, samples - 2, 1 + k * c)
    p = np.asarray(probs, np.float64)[: samples - 2]  # (S, chains, N, C)
    loglik = np.log(np.take_along_axis(p, np.asarray(labels)[None, None, :, None], -1)[..., 0])
    np.testing.assert_allclose(draws[..., 0], loglik.mean(-1).T, rtol=1e-5)
    np.testing.assert_allclose(
        draws[..., 1:], np.log(p[:, :, :k]).reshape(samples - 2, chains, -1).swapaxes(0, 1), 1e-5
    )


def test_traces_plot(tmp_path):
    x = ar1(3, 120, 0.8, q=2)
    metrics = D.chain_metrics(x)
    path = plots.traces(tmp_path / "traces.png", x, metrics["rhat"], metrics["ess"], "t")
    image = mpimg.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 200 and image[..., :3].std() > 0.01
    one = plots.traces(tmp_path / "one.png", x[:1], math.nan, 50.0, "one chain")
    assert one.is_file()


def test_quantities_are_exact_far_below_any_clip():
    # logits (0, -80): the label's probability is e^-80 ≈ 1.8e-35, far below a 1e-12 floor
    logits = jnp.asarray([[[0.0, -80.0], [0.0, 0.0]]])  # (1 chain, 2 inputs, 2 classes)
    q = np.asarray(D.sample_quantities(jax.nn.log_softmax(logits, -1), jnp.asarray([1, 0]), [0]))
    lse = np.logaddexp(0.0, -80.0)  # float64 reference
    want = [np.mean([-80.0 - lse, np.log(0.5)]), -lse, -80.0 - lse]
    np.testing.assert_allclose(q[0], want, rtol=1e-6, atol=1e-30)


SGLD = [
    "method=sgld",
    "method.batch_size=64",
    "method.steps=60",
    "method.burn_in=20",
    "method.members_per_chain=8",
    "method.chunk_size=20",
    "method.step_size.step_size=1e-3",
]


@pytest.mark.e2e  # a run
def test_sgld_run_reports_rhat_ess_and_traces_of_its_chains(tmp_path):
    cfg = compose_cfg(*tiny("sgld"), *SGLD, "method.num_chains=3", "method.save_samples=true")
    metrics = run(cfg, tmp_path)
    assert (tmp_path / "plots" / "traces.png").is_file()
    # recompute the tracked quantities from the saved samples, outside the sampler loop
    data = build(cfg.dataset, "dataset").load()
    model = build_model(build(cfg.model, "model", num_classes=10), data.spec, "mlp", 128)
    template = jax.vmap(lambda k: model.init(k)[0])(jax.random.split(jax.random.key(0), 24))
    samples = serialization.from_bytes(template, (tmp_path / "samples.msgpack").read_bytes())
    logits = jax.vmap(lambda p: model.logits(p, {}, data.test.x))(samples)
    logp = np.asarray(logits, np.float64)
    logp = logp - np.logaddexp.reduce(logp, axis=-1, keepdims=True)  # exact, nothing clipped
    logp = logp.reshape(8, 3, *logp.shape[1:]).swapaxes(0, 1)  # (chains, S, N, C)
    y = np.asarray(data.test.y)
    loglik = np.take_along_axis(logp, y[None, None, :, None], -1)[..., 0].mean(-1)
    kept = logp[:, :, :5].reshape(3, 8, -1)  # eval.keep_inputs
    draws = np.concatenate([loglik[..., None], kept], axis=-1)  # (chains, S, Q)
    # the run folder keeps the draws it computed the diagnostics from
    saved = np.load(tmp_path / D.TRACES)
    assert saved.shape == draws.shape == (3, 8, 1 + 5 * 10)
    np.testing.assert_allclose(saved, draws, rtol=1e-4, atol=1e-5)
    recomputed = D.chain_metrics(saved)
    for name in ("rhat", "ess", "ess_tail"):
        assert metrics[f"test/{name}"] == pytest.approx(recomputed[name], rel=1e-6)
    varying = np.ptp(saved.reshape(24, -1), axis=0) > 0
    want = arviz(saved[..., varying].astype(np.float64))
    assert metrics["test/rhat"] == pytest.approx(want["rhat"].max(), rel=1e-6)
    assert metrics["test/ess"] == pytest.approx(want["ess"].min(), rel=1e-6)
    assert metrics["test/ess_tail"] == pytest.approx(want["ess_tail"].min(), rel=1e-6)
    assert "val/rhat" not in metrics  # the test set is the one tracked


@pytest.mark.e2e  # a run
def test_one_chain_run_has_ess_and_null_rhat(tmp_path):
    run(compose_cfg(*tiny("sgld"), *SGLD, "method.num_chains=1", "eval.plots=false"), tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test/rhat"] is None and saved["test/ess"] > 0 and saved["test/ess_tail"] > 0
    assert np.load(tmp_path / D.TRACES).shape[:2] == (1, 8)


@pytest.mark.e2e  # a run
def test_a_point_estimate_writes_no_traces(tmp_path):
    run(compose_cfg(*tiny("map"), "trainer.epochs=1", "eval.plots=false"), tmp_path)
    assert not (tmp_path / D.TRACES).exists()
