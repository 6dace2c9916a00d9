"""Sampler diagnostics: split-R̂ and ESS against blackjax.diagnostics and a direct
formula, on mixed and stuck chains; the trace folded in a scan; the traces plot; an
SGLD run's test/rhat and test/ess against its saved samples."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import matplotlib.image as mpimg
import numpy as np
import pytest
from blackjax import diagnostics as bd
from flax import serialization

from bnn_bench.config import build
from bnn_bench.evaluation import diagnostics as D
from bnn_bench.models import build_model
from bnn_bench.reporting import plots
from bnn_bench.run import run
from tests.conftest import compose_cfg, tiny


def ar1(chains: int, samples: int, rho: float, q: int = 3, seed: int = 0) -> np.ndarray:
    """(chains, samples, q) stationary AR(1) chains of unit marginal variance."""
    rng = np.random.default_rng(seed)
    x = np.empty((chains, samples, q))
    x[:, 0] = rng.standard_normal((chains, q))
    for t in range(1, samples):
        x[:, t] = rho * x[:, t - 1] + math.sqrt(1 - rho**2) * rng.standard_normal((chains, q))
    return x


def split_rhat_by_hand(x: np.ndarray) -> np.ndarray:
    """Split-R̂ as BDA3 §11.4 writes it, for (chains, S, Q)."""
    half = x.shape[1] // 2
    s = np.concatenate([x[:, :half], x[:, -half:]], axis=0)  # (2 chains, n, Q)
    n = s.shape[1]
    b = n * s.mean(1).var(0, ddof=1)
    w = s.var(1, ddof=1).mean(0)
    return np.sqrt(((n - 1) / n * w + b / n) / w)


def test_rhat_and_ess_equal_blackjax_and_the_direct_formula():
    x = ar1(4, 301, 0.5)  # odd: the middle sample of each chain is dropped when splitting
    half = 150
    split = np.concatenate([x[:, :half], x[:, -half:]], axis=0)
    np.testing.assert_allclose(
        D.split_rhat(x), bd.potential_scale_reduction(split, chain_axis=0, sample_axis=1), 1e-6
    )
    np.testing.assert_allclose(D.split_rhat(x), split_rhat_by_hand(x), rtol=1e-6)
    np.testing.assert_allclose(
        D.effective_sample_size(x), bd.effective_sample_size(x, chain_axis=0, sample_axis=1), 1e-6
    )
    assert np.all(D.split_rhat(x) < 1.05)


def test_ess_counts_independent_and_correlated_draws():
    iid = D.effective_sample_size(ar1(4, 500, 0.0, q=20))
    assert 0.85 * 2000 < np.median(iid) < 1.15 * 2000
    # AR(1): ESS ≈ N (1 - ρ) / (1 + ρ) = 2000 · 0.1 / 1.9 ≈ 105
    correlated = D.effective_sample_size(ar1(4, 500, 0.9, q=20))
    assert 60 < np.median(correlated) < 160


def test_rhat_is_large_for_chains_stuck_in_different_places():
    x = ar1(4, 200, 0.5) + np.array([0.0, 5.0, 10.0, 15.0])[:, None, None]
    assert np.all(D.split_rhat(x) > 3)
    metrics = D.chain_metrics(x)
    assert metrics["rhat"] > 3
    # a drift inside each chain shows in split-R̂ even when the chains agree
    drift = ar1(4, 200, 0.5) + np.linspace(0, 6, 200)[None, :, None]
    assert np.all(D.split_rhat(drift) > 1.3)


def test_one_chain_has_an_ess_and_no_rhat():
    x = ar1(1, 200, 0.5)
    metrics = D.chain_metrics(x)
    assert math.isnan(metrics["rhat"])
    assert metrics["ess"] == pytest.approx(float(np.min(bd.effective_sample_size(x))), 1e-6)


def test_constant_quantities_are_left_out():
    x = ar1(2, 100, 0.3, q=2)
    x[..., 1] = math.log(1e-12)  # a probability clipped in every sample
    metrics = D.chain_metrics(x)
    assert metrics["ess"] == pytest.approx(float(D.effective_sample_size(x[..., 0])), 1e-6)
    assert metrics["rhat"] == pytest.approx(float(D.split_rhat(x[..., 0])), 1e-6)


def test_trace_folds_each_sample_inside_a_scan():
    chains, samples, n, c, k = 3, 7, 20, 4, 2
    logits = jax.random.normal(jax.random.key(0), (samples, chains, n, c))
    probs = jax.nn.softmax(logits, -1)
    labels = jax.random.randint(jax.random.key(1), (n,), 0, c)

    def body(trace, p):
        return trace.add(D.sample_quantities(p, labels, jnp.arange(k))), None

    empty = D.ChainTrace.empty(samples - 2, chains, 1 + k * c)  # room for 5: two are dropped
    trace, _ = jax.jit(lambda t, p: jax.lax.scan(body, t, p))(empty, probs)
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


def test_jnp_quantities_are_finite_for_zero_probabilities():
    probs = jnp.asarray([[[1.0, 0.0], [0.5, 0.5]]])  # (1 chain, 2 inputs, 2 classes)
    q = D.sample_quantities(probs, jnp.asarray([1, 0]), [0])
    assert np.all(np.isfinite(np.asarray(q)))
    np.testing.assert_allclose(
        np.asarray(q)[0], [np.mean(np.log([1e-12, 0.5])), 0.0, np.log(1e-12)], rtol=1e-5
    )


SGLD = [
    "method=sgld",
    "method.batch_size=64",
    "method.iterations=60",
    "method.burn_in=20",
    "method.accepted_samples=8",
    "method.chunk_size=20",
    "method.step_size.step_size=1e-3",
]


def test_sgld_run_reports_rhat_ess_and_traces_of_its_chains(tmp_path):
    cfg = compose_cfg(*tiny("sgld"), *SGLD, "method.num_chains=3", "method.save_samples=true")
    metrics = run(cfg, tmp_path)
    assert (tmp_path / "plots" / "traces.png").is_file()
    # recompute the tracked quantities from the saved samples, outside the sampler loop
    data = build(cfg.dataset, "dataset")
    model = build_model(build(cfg.model, "model", num_classes=10), data.spec, "mlp", 128)
    template = jax.vmap(lambda k: model.init(k)[0])(jax.random.split(jax.random.key(0), 24))
    samples = serialization.from_bytes(template, (tmp_path / "samples.msgpack").read_bytes())
    probs = np.asarray(jax.vmap(lambda p: model.probs(p, {}, data.test.x))(samples), np.float64)
    probs = probs.reshape(8, 3, *probs.shape[1:]).swapaxes(0, 1)  # (chains, S, N, C)
    y = np.asarray(data.test.y)
    loglik = np.log(np.take_along_axis(probs, y[None, None, :, None], -1)[..., 0]).mean(-1)
    logp = np.log(np.clip(probs[:, :, :5], 1e-12, None)).reshape(3, 8, -1)  # eval.keep_inputs
    draws = np.concatenate([loglik[..., None], logp], axis=-1)
    rhat = np.max(bd.potential_scale_reduction(D.split_chains(draws), 0, 1))
    ess = np.min(bd.effective_sample_size(draws, 0, 1))
    assert metrics["test/rhat"] == pytest.approx(float(rhat), rel=1e-3)
    assert metrics["test/ess"] == pytest.approx(float(ess), rel=1e-3)
    assert "val/rhat" not in metrics  # the test set is the one tracked


def test_one_chain_run_has_ess_and_null_rhat(tmp_path):
    run(compose_cfg(*tiny("sgld"), *SGLD, "method.num_chains=1", "eval.plots=false"), tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test/rhat"] is None and saved["test/ess"] > 0
