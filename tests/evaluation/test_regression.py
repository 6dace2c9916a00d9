"""Regression metrics of a Gaussian mixture against scipy (S = 1: ``scipy.stats.norm``),
numerical integration and Monte Carlo, on fixed arrays."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, special, stats

from bnn_bench.evaluation import regression as R

pytestmark = pytest.mark.unit


def _mixture(seed=0, s=4, n=6):
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 2.0, (s, n))
    sd = rng.uniform(0.3, 1.5, (s, n))
    y = rng.normal(0.0, 2.5, n)
    return mu, sd, y


def test_to_original_and_moments():
    members = np.array([[[1.0, 0.0], [-1.0, np.log(2.0)]]])  # (1, 2, 2)
    mu, sd = R.to_original(members, target_mean=10.0, target_std=3.0)
    np.testing.assert_allclose(mu, [[13.0, 7.0]])
    np.testing.assert_allclose(sd, [[3.0, 6.0]])
    # two members N(0, 1) and N(2, 1): mean 1, variance 1 + 1 (spread of the means)
    m, s = R.moments(np.array([[0.0], [2.0]]), np.array([[1.0], [1.0]]))
    np.testing.assert_allclose(m, [1.0])
    np.testing.assert_allclose(s, [np.sqrt(2.0)])


def test_single_gaussian_against_scipy_norm():
    mu, sd, y = _mixture(s=1, n=7)
    dist = stats.norm(mu[0], sd[0])
    np.testing.assert_allclose(R.nll(mu, sd, y), -dist.logpdf(y).mean(), rtol=1e-12)
    assert R.rmse(mu, y) == pytest.approx(np.sqrt(np.mean((mu[0] - y) ** 2)))
    # Gaussian CRPS, Gneiting & Raftery 2007 eq. 21: σ[z(2Φ(z) − 1) + 2φ(z) − 1/√π]
    z = (y - mu[0]) / sd[0]
    closed = sd[0] * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))
    np.testing.assert_allclose(R.crps_per_input(mu, sd, y), closed, rtol=1e-10)
    levels = np.array([0.5, 0.9, 0.95])
    lo, hi = dist.interval(levels[:, None])
    np.testing.assert_allclose(R.width(mu, sd, levels), (hi - lo).mean(-1), rtol=1e-9)
    np.testing.assert_allclose(
        R.coverage(mu, sd, y, levels), ((y >= lo) & (y <= hi)).mean(-1), atol=0
    )


def test_mixture_nll_is_log_of_mean_density():
    mu, sd, y = _mixture()
    density = stats.norm(mu, sd).pdf(y).mean(0)
    np.testing.assert_allclose(R.nll(mu, sd, y), -np.log(density).mean(), rtol=1e-12)
    # far in a tail, where every member's density underflows to 0, still finite and exact
    far = np.full(6, 80.0)
    assert np.all(stats.norm(mu, sd).pdf(far) == 0.0)
    ref = special.logsumexp(stats.norm(mu, sd).logpdf(far), axis=0) - np.log(mu.shape[0])
    np.testing.assert_allclose(R.log_density(mu, sd, far), ref, rtol=1e-12)


def test_mixture_crps_against_numerical_integration():
    """CRPS(F, y) = ∫ (F(t) − 1[t ≥ y])² dt, integrated with scipy.integrate.quad."""
    mu, sd, y = _mixture(seed=1, s=3, n=4)
    got = R.crps_per_input(mu, sd, y, max_elements=20)  # several chunks of inputs
    for n in range(4):

        def f(t, n=n):
            return (R.cdf(mu[:, n : n + 1], sd[:, n : n + 1], np.array([t]))[0] - (t >= y[n])) ** 2

        lo, hi = (mu[:, n] - 12 * sd[:, n]).min(), (mu[:, n] + 12 * sd[:, n]).max()
        ref = integrate.quad(f, lo, y[n], limit=200)[0] + integrate.quad(f, y[n], hi, limit=200)[0]
        assert got[n] == pytest.approx(ref, rel=1e-7)


def test_mixture_crps_against_monte_carlo():
    """CRPS = E|Y − y| − ½ E|Y − Y'| with 400,000 draws of the mixture."""
    mu, sd, y = _mixture(seed=2, s=5, n=3)
    rng = np.random.default_rng(0)
    m = 400_000
    k = rng.integers(0, 5, (2, m))
    for n in range(3):
        a = rng.normal(mu[k[0], n], sd[k[0], n])
        b = rng.normal(mu[k[1], n], sd[k[1], n])
        mc = np.abs(a - y[n]).mean() - 0.5 * np.abs(a - b).mean()
        assert R.crps_per_input(mu, sd, y)[n] == pytest.approx(mc, abs=0.01)


def test_quantiles_and_coverage_of_a_mixture():
    mu, sd, y = _mixture(seed=3, s=3, n=5)
    q = np.array([0.025, 0.25, 0.5, 0.975])
    got = R.quantile(mu, sd, q)  # (4, 5)
    # the CDF at the quantile is the level (scipy's norm CDF, mixed by hand)
    back = np.stack([stats.norm(mu, sd).cdf(got[i]).mean(0) for i in range(4)])
    np.testing.assert_allclose(back, np.broadcast_to(q[:, None], back.shape), atol=1e-12)
    # coverage from the PIT equals coverage counted against the bisected interval ends
    levels = np.array(R.CALIBRATION_LEVELS)
    ends = R.quantile(mu, sd, np.concatenate([(1 - levels) / 2, (1 + levels) / 2]))
    inside = (y >= ends[: len(levels)]) & (y <= ends[len(levels) :])
    np.testing.assert_allclose(R.coverage(mu, sd, y, levels), inside.mean(-1))


def test_calibrated_predictive_lies_on_the_diagonal():
    """Targets drawn from the predictive itself: observed coverage ≈ expected (±3 se)."""
    rng = np.random.default_rng(4)
    n = 4000
    mu = rng.normal(0, 1, (2, n))
    sd = rng.uniform(0.5, 2.0, (2, n))
    pick = rng.integers(0, 2, n)
    y = rng.normal(mu[pick, np.arange(n)], sd[pick, np.arange(n)])
    curve = R.calibration_curve(mu, sd, y)
    exp, obs = np.array(curve["expected"]), np.array(curve["observed"])
    assert np.all(np.abs(obs - exp) <= 3 * np.sqrt(exp * (1 - exp) / n) + 1e-9)
    out = R.regression_metrics(mu, sd, y)
    assert set(out) == {
        "rmse", "nll", "crps", "std",
        "coverage_50", "coverage_90", "coverage_95", "width_50", "width_90", "width_95",
    }  # fmt: skip
    assert out["coverage_95"] == pytest.approx(0.95, abs=0.015)
