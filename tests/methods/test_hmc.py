"""Full-batch HMC: the exact posterior of Bayesian linear regression (with and without
step-size jitter), the warm-up's step size, plain BlackJAX HMC draw for draw without jitter,
the jitter's band, the method's config checks, the cap on L, resume, and the same
posterior as SG-MCMC at T = 1."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blackjax.mcmc import hmc as bj_hmc

from bnn_bench.checkpoint import Preempted
from bnn_bench.config import build
from bnn_bench.errors import UserError
from bnn_bench.methods.sampling.hmc import HMC, hmc_chains, integration_steps
from bnn_bench.methods.sampling.kernels import make_log_density
from bnn_bench.models import build_model
from bnn_bench.run import run
from tests.conftest import compose_cfg, tiny

pytestmark = pytest.mark.e2e

# ------------------------------------------------ Bayesian linear regression, closed form

# y = X w + N(0, σ²), w ~ N(0, s² I): the posterior is N(μ, Σ) with
#   Σ = (XᵀX / σ² + I / s²)⁻¹,   μ = Σ Xᵀy / σ².
N_DATA, DIM, NOISE, PRIOR = 40, 3, 0.5, 1.0
KEY = jax.random.key(0)
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


@pytest.mark.parametrize("jitter", [0.0, 0.1])
def test_hmc_recovers_the_linear_regression_posterior_within_monte_carlo_error(jitter):
    x, y, mean, cov = _regression()
    tau = 0.5 * np.pi * np.sqrt(np.linalg.eigvalsh(cov).max())  # a quarter of the widest period
    kernel = hmc_chains(_log_density(x, y), tau, WARMUP, target_acceptance=0.8, jitter=jitter)
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
    kernel = hmc_chains(_log_density(x, y), 0.3, burn_in=0)
    chains = kernel.init({"w": jnp.zeros((2, DIM))}, 0.05)
    step = jax.jit(kernel.step)
    for t in range(3):
        chains = step(jax.random.key(t), chains, t)
    assert float(chains.step_size) == pytest.approx(0.05)
    assert int(chains.stats.leapfrog_steps) == 3 * 6  # ⌈0.3 / 0.05⌉ per transition


def _run_chains(kernel, key, start, eps, transitions):
    """(transitions, chains, DIM) positions and (transitions, chains) used step sizes."""
    chains = kernel.init({"w": start}, eps)

    def body(chains, t):
        chains = kernel.step(jax.random.fold_in(key, t), chains, t)
        return chains, (chains.states.position["w"], chains.used_step_sizes)

    return jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(transitions)))(chains)


def test_without_jitter_the_chains_are_plain_blackjax_hmc_draw_for_draw():
    x, y, _, _ = _regression()
    density, start = _log_density(x, y), jnp.zeros((4, DIM))
    last, (path, used) = _run_chains(hmc_chains(density, 0.3, 0, jitter=0.0), KEY, start, 0.05, 6)
    np.testing.assert_array_equal(used, 0.05 * np.ones((6, 4), np.float32))

    kernel = bj_hmc.build_kernel()  # BlackJAX alone: ε = 0.05, L = ⌈0.3 / 0.05⌉ = 6

    def one(k, state):
        return kernel(k, state, density, 0.05, jnp.ones(DIM), 6)[0]

    states, step = jax.vmap(lambda p: bj_hmc.init({"w": p}, density))(start), jax.jit(jax.vmap(one))
    for t in range(6):
        states = step(jax.random.split(jax.random.fold_in(KEY, t), 4), states)
        np.testing.assert_allclose(path[t], states.position["w"], rtol=1e-6, atol=1e-7)
    assert float(last.stats.trajectory) == pytest.approx(6 * 6 * 0.05, rel=1e-6)


def test_jitter_varies_each_chains_step_size_within_its_band():
    x, y, _, _ = _regression()
    density, start, eps, transitions = _log_density(x, y), jnp.zeros((4, DIM)), 0.05, 100
    kernel = hmc_chains(density, 0.3, 0, jitter=0.1)
    last, (path, used) = _run_chains(kernel, KEY, start, eps, transitions)
    used = np.asarray(used, np.float64)  # (transitions, chains)
    assert np.all(used >= 0.9 * eps * (1 - 1e-6)) and np.all(used <= 1.1 * eps * (1 + 1e-6))
    # spread over the band, drawn anew per transition and per chain
    assert used.min() < 0.92 * eps and used.max() > 1.08 * eps
    assert np.abs(used.mean() / eps - 1) < 0.02  # U(-1, 1): mean 1, se 0.058 / √400
    assert np.all(np.ptp(used, axis=1) > 0) and np.all(np.ptp(used, axis=0) > 0)
    # L stays ⌈τ/ε⌉ of the unjittered ε; the trajectory length follows the used ε
    assert int(last.stats.leapfrog_steps) == transitions * 6
    assert float(last.stats.trajectory) == pytest.approx(6 * used.mean(1).sum(), rel=1e-5)
    # the jitter draws from its own stream: ε's changes alone move the chains away
    _, (plain, _) = _run_chains(hmc_chains(density, 0.3, 0), KEY, start, eps, transitions)
    assert not np.allclose(path, plain)


@pytest.mark.parametrize("jitter", [-0.1, 1.0])
def test_a_jitter_outside_zero_to_one_is_refused(jitter):
    with pytest.raises(ValueError, match=r"jitter must be in \[0, 1\)"):
        hmc_chains(lambda p: 0.0, 0.3, 0, jitter=jitter)


# ------------------------------------------------------------------------- the method

# 8 warm-up transitions and 4 samples of 2 chains, in chunks of 3: 3, 6, 8 | 11, 12
HMC_TINY = [
    *tiny("hmc"),
    "method.trajectory_length=0.05",
    "method.step_size=1e-2",
    "method.max_integration_steps=20",
    "method.burn_in=8",
    "method.members_per_chain=4",
    "method.num_chains=2",
    "method.chunk_size=3",
]


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.members_per_chain=0", "method.members_per_chain must be positive"),
        ("method.temperature=0", "method.temperature must be positive"),
        ("method.burn_in=-1", "method.burn_in must be >= 0"),
        ("method.target_acceptance=1", r"method.target_acceptance must be in \(0, 1\)"),
        ("method.jitter=1", r"method.jitter must be in \[0, 1\)"),
        ("method.jitter=-0.1", r"method.jitter must be in \[0, 1\)"),
    ],
)
def test_bad_settings_are_refused_by_name(override, message):
    with pytest.raises(UserError, match=message):
        build(compose_cfg(*HMC_TINY, override).method, "method")


def test_a_model_with_batch_norm_is_refused():
    mlp = [o for o in HMC_TINY if not o.startswith("model")]
    cfg = compose_cfg(*mlp, "model=lenet", "model.norm=batchnorm")
    data = build(cfg.dataset, "dataset").load()
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(module, data.spec, "lenet")
    with pytest.raises(UserError, match="method=hmc needs a model without batch norm"):
        build(cfg.method, "method").check(model, data)


def test_the_log_density_is_sgmcmcs_on_all_of_train_divided_by_t():
    """The same posterior as SG-MCMC at T = 1: ``make_log_density`` with batch = train."""
    cfg = compose_cfg(*HMC_TINY, "method.temperature=2", "method.prior_scale=0.5")
    data = build(cfg.dataset, "dataset").load()
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
        if not k.startswith(("time/", "cost/compile", "cost/attempts", "hmc/burn_in_trans"))
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
    assert metrics["hmc/trajectory_length"] == pytest.approx(steps * metrics["hmc/step_size"])
    assert steps < 20 and metrics["hmc/trajectory_length"] >= 0.05  # L = ⌈τ/ε⌉, not capped
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


def test_a_cap_on_l_is_warned_about_and_the_shorter_trajectory_reported(tmp_path, caplog):
    # no warm-up: ε = 0.01 throughout, so τ = 0.05 needs L = 5, capped at 3; jittered ±10%
    cfg = [*HMC_TINY, "method.burn_in=0", "method.max_integration_steps=3", "eval.plots=false"]
    with caplog.at_level("WARNING", logger="bnn_bench"):
        metrics = run(compose_cfg(*cfg, "method.jitter=0.1"), tmp_path)
    assert "method.max_integration_steps=3 caps L" in caplog.text
    assert "needs L = ⌈τ/ε⌉ = 5 leapfrog steps" in caplog.text
    assert metrics["hmc/integration_steps"] == 3
    length = metrics["hmc/trajectory_length"]  # the mean over 4 transitions x 2 chains
    assert 0.9 * 0.03 < length < 1.1 * 0.03 and length != pytest.approx(0.03, rel=1e-6)
