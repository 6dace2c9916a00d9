"""Metrics of a regression predictive: an equally weighted mixture of S Gaussians per input.

Every member s gives, for input n, a Gaussian N(mu[s, n], sd[s, n]^2) in the target's
original units; the predictive is their average p(y | x_n) = 1/S Σ_s N(y; mu_sn, sd_sn^2)
(S = 1: a single Gaussian, e.g. MAP with its noise). Pure numpy/scipy functions on
``mu: (S, N)``, ``sd: (S, N)`` and targets ``y: (N,)``; each is tested against scipy or a
closed form (``tests/evaluation/test_regression.py``).
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

LEVELS = (0.5, 0.9, 0.95)  # central predictive intervals reported as coverage_/width_<100·level>
CALIBRATION_LEVELS = tuple(np.round(np.linspace(0.05, 0.95, 19), 2)) + (0.99,)


def _f64(*arrays):
    return tuple(np.asarray(a, np.float64) for a in arrays)


def to_original(members, target_mean: float, target_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Members' (mean, log σ) in standardised units -> (mu, sd) in the target's units.

    Args:
      members: (S, N, 2) standardised mean and log σ of each member (``Gaussian.member``).
      target_mean, target_std: the training targets' mean and std the data were
        standardised with (y = target_mean + target_std · z).

    Returns:
      mu: (S, N) and sd: (S, N), float64.
    """
    (m,) = _f64(members)
    return target_mean + target_std * m[..., 0], target_std * np.exp(m[..., 1])


def moments(mu, sd) -> tuple[np.ndarray, np.ndarray]:
    """(N,) mean and (N,) standard deviation of the mixture: E[y] = mean_s mu_s,
    Var[y] = mean_s (sd_s² + mu_s²) − E[y]² (law of total variance)."""
    mu, sd = _f64(mu, sd)
    mean = mu.mean(0)
    var = (sd**2 + mu**2).mean(0) - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


def rmse(mu, y) -> float:
    """Root mean squared error of the mixture mean (mean_s mu_s) against y."""
    mu, y = _f64(mu, y)
    return float(np.sqrt(np.mean((mu.mean(0) - y) ** 2)))


def log_density(mu, sd, y) -> np.ndarray:
    """(N,) log p(y_n | x_n) = logsumexp_s log N(y_n; mu_sn, sd_sn²) − log S: exact
    where every member's density underflows."""
    mu, sd, y = _f64(mu, sd, y)
    z = (y - mu) / sd
    logp = -0.5 * z**2 - np.log(sd) - 0.5 * np.log(2 * np.pi)  # (S, N)
    return special.logsumexp(logp, axis=0) - np.log(mu.shape[0])


def nll(mu, sd, y) -> float:
    """Mean over inputs of the mixture's negative log density (nats, original units)."""
    return float(-np.mean(log_density(mu, sd, y)))


def _a(m, var):
    """A(m, σ²) = E|Z| for Z ~ N(m, σ²) = 2σ φ(m/σ) + m (2 Φ(m/σ) − 1)."""
    s = np.sqrt(var)
    r = m / s
    return 2 * s * stats.norm.pdf(r) + m * (2 * stats.norm.cdf(r) - 1)


def crps_per_input(mu, sd, y, max_elements: int = 4_000_000) -> np.ndarray:
    """(N,) CRPS of the Gaussian mixture at y, closed form (Grimit, Gneiting, Berrocal &
    Johnson 2006, eq. 5): CRPS = E|Y − y| − ½ E|Y − Y'|
    = 1/S Σ_i A(y − mu_i, sd_i²) − 1/(2S²) Σ_ij A(mu_i − mu_j, sd_i² + sd_j²).

    The pairwise term is O(S²) per input, done a few inputs at a time so that at most
    ``max_elements`` pairs are held at once.
    """
    mu, sd, y = _f64(mu, sd, y)
    s, n = mu.shape
    first = _a(y - mu, sd**2).mean(0)  # (N,)
    second = np.empty(n)
    step = max(1, max_elements // (s * s))
    for lo in range(0, n, step):
        m, v = mu[:, lo : lo + step], sd[:, lo : lo + step] ** 2  # (S, n')
        pair = _a(m[:, None] - m[None, :], v[:, None] + v[None, :])  # (S, S, n')
        second[lo : lo + step] = pair.mean((0, 1))
    return first - 0.5 * second


def crps(mu, sd, y) -> float:
    """Mean CRPS over inputs (original units; lower is better; = MAE for a point mass)."""
    return float(np.mean(crps_per_input(mu, sd, y)))


def cdf(mu, sd, t) -> np.ndarray:
    """(..., N) mixture CDF F_n(t) = mean_s Φ((t − mu_sn) / sd_sn) at t: (N,) or (L, N)."""
    mu, sd, t = _f64(mu, sd, t)
    return special.ndtr((t[..., None, :] - mu) / sd).mean(-2)


def quantile(mu, sd, q, iters: int = 100) -> np.ndarray:
    """(L, N) mixture quantiles F_n⁻¹(q) for levels q: (L,), by bisection on the CDF.

    The CDF is continuous and increasing, and every quantile in (0, 1) lies between the
    smallest member quantile and the largest, which bracket the search; 100 halvings
    shrink the bracket below float64 resolution.
    """
    mu, sd = _f64(mu, sd)
    q = np.asarray(q, np.float64).reshape(-1, 1)  # (L, 1)
    z = special.ndtri(q)[..., None]  # (L, 1, 1)
    lo = (mu + z * sd).min(-2) * np.ones((q.shape[0], mu.shape[1]))  # (L, N)
    hi = (mu + z * sd).max(-2) * np.ones_like(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = cdf(mu, sd, mid) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def pit(mu, sd, y) -> np.ndarray:
    """(N,) probability integral transform F_n(y_n)."""
    return cdf(mu, sd, np.asarray(y, np.float64))


def coverage(mu, sd, y, levels) -> np.ndarray:
    """(L,) share of y inside the central interval of each level: y_n lies in
    [F⁻¹((1−a)/2), F⁻¹((1+a)/2)] exactly when |2 F(y_n) − 1| ≤ a (F continuous and
    increasing), so no quantile is needed."""
    u = np.abs(2 * pit(mu, sd, y) - 1)  # (N,)
    return (u[None, :] <= np.asarray(levels, np.float64)[:, None]).mean(-1)


def width(mu, sd, levels) -> np.ndarray:
    """(L,) mean width over inputs of the central interval of each level."""
    a = np.asarray(levels, np.float64)
    q = quantile(mu, sd, np.concatenate([(1 - a) / 2, (1 + a) / 2]))  # (2L, N)
    return (q[len(a) :] - q[: len(a)]).mean(-1)


def calibration_curve(mu, sd, y, levels=CALIBRATION_LEVELS) -> dict[str, list[float]]:
    """Expected against observed coverage of the central intervals: ``{"expected": levels,
    "observed": coverage}``; a calibrated predictive lies on the diagonal."""
    return {
        "expected": [float(a) for a in levels],
        "observed": [float(c) for c in coverage(mu, sd, y, levels)],
    }


def regression_metrics(mu, sd, y, levels=LEVELS) -> dict[str, float]:
    """``rmse``, ``nll``, ``crps``, ``coverage_<p>`` and ``width_<p>`` (p = 100·level) of
    the mixture, all in the target's original units, and ``std``: the mean predictive
    standard deviation."""
    out = {"rmse": rmse(mu, y), "nll": nll(mu, sd, y), "crps": crps(mu, sd, y)}
    out["std"] = float(moments(mu, sd)[1].mean())
    for a, c, w in zip(levels, coverage(mu, sd, y, levels), width(mu, sd, levels), strict=True):
        out[f"coverage_{round(100 * a)}"] = float(c)
        out[f"width_{round(100 * a)}"] = float(w)
    return out
