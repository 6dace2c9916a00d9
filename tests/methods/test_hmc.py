"""Full-batch HMC: the exact posterior of Bayesian linear regression, the warm-up's step
size, the method's config checks, resume, and the same posterior as SG-MCMC at T = 1."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.checkpoint import Preempted
from bnn_bench.config import build
from bnn_bench.errors import UserError
from bnn_bench.methods.hmc import HMC, hmc_chains, integration_steps
from bnn_bench.methods.sgmcmc import make_log_density
from bnn_bench.models import build_model
from bnn_bench.run import run
from tests.conftest import compose_cfg, tiny

# ------------------------------------------------ Bayesian linear regression, closed form

# y = X w + N(0, σ²), w ~ N(0, s² I): the posterior is N(μ, Σ) with
#   Σ = (XᵀX / σ² + I / s²)⁻¹,   μ = Σ Xᵀy / σ².
N_DATA, DIM, NOISE, PRIOR = 40, 3, 0.5, 1.0
CHAINS, WARMUP, SAMPLES = 64, 200, 400
Z = 4.0  # standard errors; 9 mean and covariance checks at once


def _regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_DATA, DIM)) * np.array([1.0, 0.5, 2.0])  # unequal posterior widths
    x[:, 1] += 0.8 * x[:, 0]  # correlated weights
    y = x @ np.array([1.0, -2.0, 0.5]) + NOISE * rng.normal(size=N_DATA)
    cov = np.linalg.inv(x.T @ x / NOISE**2 + np.eye(DIM) / PRIOR**2)
    return x, y, cov @ x.T @ y / NOISE**2, cov


def _log_density(x, y):
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def log_density(position):  # the position is a pytree, as a network's parameters
        w = position["w"]
        return -0.5 * jnp.sum(w**2) / PRIOR**2 - 0.5 * jnp.sum((y - x @ w) ** 2) / NOISE**2

    return log_density


def _sample(kernel, key, start):
    """(SAMPLES, CHAINS, DIM) post-warm-up positions and the final chains' state. Jittable."""
    chains = kernel.init({"w": start}, 0.1)

    def body(chains, t):
        chains = kernel.step(jax.random.fold_in(key, t), chains, t)
        return chains, chains.states.position["w"]

    chains, path = jax.lax.scan(body, chains, jnp.arange(WARMUP + SAMPLES))
    return path[WARMUP:], chains


def test_hmc_recovers_the_linear_regression_posterior_within_monte_carlo_error():
    x, y, mean, cov = _regression()
    tau = 0.5 * np.pi * np.sqrt(np.linalg.eigvalsh(cov).max())  # a quarter of the widest period
    kernel = hmc_chains(_log_density(x, y), tau, WARMUP, target_acceptance=0.8)
    start = jnp.asarray(np.random.default_rng(1).normal(size=(CHAINS, DIM)) * 3, jnp.float32)
    path, chains = jax.jit(lambda k, s: _sample(kernel, k, s))(jax.random.key(0), start)
    draws = np.swapaxes(np.asarray(path, np.float64), 0, 1)  # (CHAINS, SAMPLES, DIM)

    # the warm-up tuned ε towards the target and froze it (and with it L = ⌈τ/ε⌉)
    eps, stats = float(chains.step_size), chains.stats
    acceptance = float(stats.sampling_acceptance) / SAMPLES
    assert 0.65 < acceptance < 0.95, acceptance
    steps = int(integration_steps(tau, eps, 1000))
    assert steps == int(np.ceil(tau / eps)) and steps > 1
    assert int(stats.divergences) == 0

    # pooled mean and covariance against the closed form; standard errors from the
    # chain-to-chain spread of the per-chain estimates (independent chains)
    pooled = draws.reshape(-1, DIM).mean(0)
    per_chain_mean = draws.mean(1)  # (C, D)
    centred = draws - pooled
    per_chain_cov = np.einsum("csi,csj->cij", centred, centred) / SAMPLES  # (C, D, D)
    mean_se = per_chain_mean.std(0, ddof=1) / np.sqrt(CHAINS)
    cov_se = per_chain_cov.std(0, ddof=1) / np.sqrt(CHAINS)
    # sharp enough to see a 10% error in any variance
    assert np.all(Z * np.diag(cov_se) < 0.1 * np.diag(cov)), (np.diag(cov_se), np.diag(cov))
    np.testing.assert_array_less(np.abs(pooled - mean), Z * mean_se)
    np.testing.assert_array_less(np.abs(per_chain_cov.mean(0) - cov), Z * cov_se)


def test_the_trajectory_length_stays_fixed_while_the_step_size_moves():
    assert int(integration_steps(1.5, 0.01, 1000)) == 150
    assert int(integration_steps(1.5, 0.0149, 1000)) == 101  # ⌈100.7⌉
    assert int(integration_steps(1.5, 1e-5, 1000)) == 1000  # capped
    assert int(integration_steps(1.5, 10.0, 1000)) == 1  # at least one step
    assert int(integration_steps(1.5, jnp.nan, 1000)) == 1000


def test_without_warmup_the_step_size_is_never_tuned():
    x, y, _, _ = _regression()
    kernel = hmc_chains(_log_density(x, y), 0.3, num_warmup=0)
    chains = kernel.init({"w": jnp.zeros((2, DIM))}, 0.05)
    step = jax.jit(kernel.step)
    for t in range(3):
        chains = step(jax.random.key(t), chains, t)
    assert float(chains.step_size) == pytest.approx(0.05)
    assert int(chains.stats.leapfrog_steps) == 3 * 6  # ⌈0.3 / 0.05⌉ per transition


# ------------------------------------------------------------------------- the method

# 8 warm-up transitions and 4 samples of 2 chains, in chunks of 3: 3, 6, 8 | 11, 12
HMC_TINY = [
    *tiny("hmc"),
    "method.trajectory_length=0.05",
    "method.step_size=1e-2",
    "method.max_integration_steps=20",
    "method.num_warmup=8",
    "method.num_samples=4",
    "method.num_chains=2",
    "method.chunk_size=3",
]


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.num_samples=0", "method.num_samples must be positive"),
        ("method.temperature=0", "method.temperature must be positive"),
        ("method.num_warmup=-1", "method.num_warmup must be >= 0"),
        ("method.target_acceptance=1", r"method.target_acceptance must be in \(0, 1\)"),
    ],
)
def test_bad_settings_are_refused_by_name(override, message):
    with pytest.raises(UserError, match=message):
        build(compose_cfg(*HMC_TINY, override).method, "method")


def test_a_model_with_batch_norm_is_refused():
    mlp = [o for o in HMC_TINY if not o.startswith("model")]
    cfg = compose_cfg(*mlp, "model=lenet", "model.norm=batchnorm")
    data = build(cfg.dataset, "dataset")
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(module, data.spec, "lenet")
    with pytest.raises(UserError, match="HMC needs a model without batch norm"):
        build(cfg.method, "method").describe(model, data)


def test_the_log_density_is_sgmcmcs_on_all_of_train_divided_by_t():
    """The same posterior as SG-MCMC at T = 1: ``make_log_density`` with batch = train."""
    cfg = compose_cfg(*HMC_TINY, "method.temperature=2", "method.prior_scale=0.5")
    data = build(cfg.dataset, "dataset")
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(module, data.spec, "mlp")
    method: HMC = build(cfg.method, "method")
    params = model.init(jax.random.key(0))[0]
    got = jax.jit(lambda p, train: method.log_density(model, train)(p))(params, data.train)
    density = make_log_density(model, data.train.size, prior_scale=0.5)
    want = density(params, data.train.x, data.train.y) / 2.0
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _results(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        k: v
        for k, v in metrics.items()
        if not k.startswith(("time/", "cost/compile", "cost/attempts", "hmc/warmup_trans"))
        and not k.startswith("hmc/sampling_trans")
    }


def test_preempted_mid_hmc_then_resumed_equals_an_uninterrupted_run(tmp_path, caplog):
    cfg = [*HMC_TINY, "checkpoint.every=1", "eval.plots=false"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    metrics = run(compose_cfg(*cfg), whole)
    assert metrics["cost/samples"] == 8 and metrics["test/rhat"] > 0
    assert 0 < metrics["hmc/acceptance_rate"] <= 1 and metrics["hmc/step_size"] > 0
    # the gradient evaluations follow the adapted ε: 2 chains x (1 + Σ L over transitions)
    steps = int(integration_steps(0.05, metrics["hmc/step_size"], 20))
    assert metrics["hmc/integration_steps"] == steps
    low, high = 2 * (1 + 8 * 1 + 4 * steps), 2 * (1 + 8 * 20 + 4 * steps)  # L in [1, 20]
    assert low <= metrics["cost/grad_evals"] <= high

    stop = ["logger._target_=tests.reporting.sigterm_logger.SigtermAt", "+logger.step=11"]
    with pytest.raises(Preempted, match="after saving step 11"):
        run(compose_cfg(*cfg, *stop), parts)  # mid-sampling: 3 samples folded of 4
    assert not (parts / "metrics.json").exists()
    saved = sorted(p.name for p in (parts / "checkpoint/resume/hmc").iterdir())
    assert saved == ["step_000000011"]

    with caplog.at_level("INFO", logger="bnn_bench"):
        run(compose_cfg(*cfg), parts)
    assert "resuming hmc from step 11" in caplog.text
    expected, got = _results(whole), _results(parts)
    assert got.keys() == expected.keys()
    assert got == expected  # bit-identical metrics (cost/grad_evals included), curves too
