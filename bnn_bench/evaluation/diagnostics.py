"""Sampler diagnostics: rank-normalised split-R̂ and bulk/tail ESS of per-sample quantities.

A multi-chain sampler (SG-MCMC, HMC) folds, for every accepted sample of every
chain, a few scalar quantities of the sample into a ``ChainTrace`` while it
samples (the trace is a pytree, safe inside ``jit`` and ``lax.scan``):

- the test log-likelihood of the sample, mean_n log p(y_n | x_n, θ_s);
- the log-probabilities log p(c | x_i, θ_s) of a few fixed test inputs (the
  summary's kept inputs, ``eval.keep_inputs``), every class: the sample's logits up
  to their per-input shift (logits themselves are only identified up to that shift).

A sampler gets this by asking its evaluation inputs for summaries with a trace,
``inputs.empty(num_classes, chains=C, samples=S)``, and folding one sample of every
chain per ``add`` (``PredictiveSummary.add``), as it does anyway.

After sampling, ``chain_metrics`` gives ``test/rhat`` (the largest R̂ over the
quantities; null with one chain), ``test/ess`` (the smallest bulk ESS) and
``test/ess_tail`` (the smallest tail ESS), as Stan and ArviZ compute them (Vehtari,
Gelman, Simpson, Carpenter & Bürkner 2021, "Rank-normalization, folding, and
localization: an improved R̂"):

- every chain is split in halves (the middle draw of an odd S is dropped), so a
  drift inside a chain shows as disagreeing halves;
- **R̂** is the larger of the bulk R̂ (BDA3's split-R̂ of the rank-normalised draws:
  the ranks r of all draws pooled, mapped to z = Φ⁻¹((r − 3/8) / (n + 1/4))) and the
  tail R̂ (the same of the draws folded about their median, |x − median|);
- **bulk ESS** is Geyer's initial-monotone-sequence ESS (as Stan) of the
  rank-normalised split chains; **tail ESS** the smaller of the ESS of the indicators
  1[x ≤ q₀.₀₅] and 1[x ≤ q₀.₉₅] on split chains (the 5% and 95% quantiles of all
  draws, R's type 7).

``traces.npy`` in the run folder keeps the draws (``write_traces``), so the numbers
can be recomputed (``chain_metrics(np.load(...))``). ``plots.traces`` draws the
log-likelihood traces.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special, stats

from bnn_bench.evaluation import metrics as M
from bnn_bench.reporting.outputs import write_npy_atomic
from bnn_bench.run_folder import TRACES  # the test set's (chains, S, Q) draws


def split_chains(x: np.ndarray) -> np.ndarray:
    """Halves of each chain as chains: (chains, S, ...) -> (2·chains, ⌊S/2⌋, ...); the
    middle sample of an odd S is dropped (as Stan and ArviZ)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)


def _per_quantity(fn, x) -> np.ndarray:
    """``fn`` of (chains, S) draws, over the last axis of (chains, S, Q) draws too."""
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        return np.asarray(fn(x), np.float64)
    return np.array([fn(x[..., q]) for q in range(x.shape[-1])], np.float64)


def _normal_scores(x: np.ndarray) -> np.ndarray:
    """Rank normalisation: Φ⁻¹((r − 3/8) / (n + 1/4)) of the ranks r (ties averaged) of
    all n entries of x (Blom's offset), same shape."""
    ranks = stats.rankdata(x, method="average", axis=None).reshape(x.shape)
    return special.ndtri((ranks - 0.375) / (x.size + 0.25))


def _rhat_of_chains(x: np.ndarray) -> float:
    """BDA3's R̂ of (chains, n) draws, the chains as given: √((n−1)/n + B/(n·W)), B/n the
    variance of the chain means, W the mean within-chain variance."""
    n = x.shape[1]
    between = n * np.var(x.mean(1), ddof=1)
    within = np.mean(np.var(x, axis=1, ddof=1))
    with np.errstate(divide="ignore", invalid="ignore"):  # W = 0: chains that never move
        return float(np.sqrt((between / within + n - 1) / n))


def _rank_rhat(x: np.ndarray) -> float:
    split = split_chains(x)
    bulk = _rhat_of_chains(_normal_scores(split))
    tail = _rhat_of_chains(_normal_scores(np.abs(split - np.median(split))))
    return max(bulk, tail)


def rank_rhat(x) -> np.ndarray:
    """Rank-normalised split-R̂ of each quantity (Vehtari et al. 2021; ``az.rhat``'s
    ``method="rank"``, Stan's R̂): the larger of the bulk and the folded (tail) R̂.

    Args:
      x: (chains, S) or (chains, S, Q) draws, chains >= 2, S >= 4.

    Returns:
      () or (Q,) R̂; near 1 when the chains' halves agree (Stan asks for < 1.01), ≫ 1
      when the chains sit in different places or drift; infinite when every chain
      stays constant at different values.
    """
    return _per_quantity(_rank_rhat, x)


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """(chains, n) autocovariance of each chain at lags 0..n−1 (divided by n), by FFT."""
    n = x.shape[1]
    size = 2 * n  # zero padding: no wrap-around
    f = np.fft.rfft(x - x.mean(1, keepdims=True), n=size, axis=1)
    return np.fft.irfft(f * np.conjugate(f), n=size, axis=1)[:, :n] / n


def _geyer_ess(x: np.ndarray) -> float:
    """ESS of (chains, n) draws: Stan's estimator (BDA3 §11.5, with Geyer's initial
    positive and initial monotone sequences and the cap N·log₁₀N on antithetic chains),
    step for step as ArviZ's ``_ess``."""
    chains, n = x.shape
    if np.max(x) - np.min(x) < np.finfo(np.float64).resolution:
        return float(x.size)  # a constant: as ArviZ
    acov = _autocovariance(x)
    mean_var = np.mean(acov[:, 0]) * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if chains > 1:
        var_plus += np.var(x.mean(1), ddof=1)
    rho = np.zeros(n)
    rho_even, rho_odd = 1.0, 1.0 - (mean_var - np.mean(acov[:, 1])) / var_plus
    rho[0], rho[1] = rho_even, rho_odd
    t = 1  # initial positive sequence: sum pairs of lags while a pair is positive
    while t < n - 3 and rho_even + rho_odd > 0.0:
        rho_even = 1.0 - (mean_var - np.mean(acov[:, t + 1])) / var_plus
        rho_odd = 1.0 - (mean_var - np.mean(acov[:, t + 2])) / var_plus
        if rho_even + rho_odd >= 0:
            rho[t + 1], rho[t + 2] = rho_even, rho_odd
        t += 2
    max_t = t - 2
    if rho_even > 0:
        rho[max_t + 1] = rho_even
    t = 1  # initial monotone sequence: pair sums may not increase
    while t <= max_t - 2:
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2.0
        t += 2
    total = chains * n
    tau = -1.0 + 2.0 * np.sum(rho[: max_t + 1]) + np.sum(rho[max_t + 1 : max_t + 2])
    tau = max(tau, 1.0 / np.log10(total))
    return math.nan if np.isnan(rho).any() else float(total / tau)


def bulk_ess(x) -> np.ndarray:
    """Bulk effective sample size of each quantity (Vehtari et al. 2021; ``az.ess``'s
    ``method="bulk"``, Stan's ESS_bulk): the ESS of the rank-normalised split chains.

    Args:
      x: (chains, S) or (chains, S, Q) draws, S >= 4.

    Returns:
      () or (Q,) ESS: about chains·S for independent draws, less when they are
      correlated.
    """
    return _per_quantity(lambda q: _geyer_ess(_normal_scores(split_chains(q))), x)


def _tail_ess(x: np.ndarray) -> float:
    low, high = np.quantile(x, [0.05, 0.95])  # numpy's default "linear" is R's type 7
    below = [split_chains((x <= q).astype(np.float64)) for q in (low, high)]
    return min(_geyer_ess(below[0]), _geyer_ess(below[1]))


def tail_ess(x) -> np.ndarray:
    """Tail effective sample size of each quantity (``az.ess``'s ``method="tail"``, Stan's
    ESS_tail): the smaller ESS of the indicators of the 5% and 95% quantiles.

    Args:
      x: (chains, S) or (chains, S, Q) draws, S >= 4.

    Returns:
      () or (Q,) ESS of the 5% and 95% quantile estimates.
    """
    return _per_quantity(_tail_ess, x)


def sample_quantities(log_probs: jax.Array, labels: jax.Array, inputs) -> jax.Array:
    """The tracked quantities of one sample per chain, exact (nothing clipped: a sample
    that gives an image probability 1e-30 is traced at -69 nats, not at a floor). Jittable.

    Args:
      log_probs: (chains, N, C) test-set class log-probabilities of each chain's sample.
      labels: (N,) test labels.
      inputs: (K,) indices of the fixed test inputs whose log-probabilities are tracked.

    Returns:
      (chains, 1 + K·C): the test log-likelihood, then log p(c | x_i) for the K inputs
      i, every class c.
    """
    loglik = -jax.vmap(lambda lp: M.nll_of_log_probs(lp, labels, xp=jnp))(log_probs)  # (chains,)
    logp = log_probs[:, jnp.asarray(inputs, jnp.int32)]  # (chains, K, C)
    return jnp.concatenate([loglik[:, None], logp.reshape(log_probs.shape[0], -1)], axis=1)


class ChainTrace(NamedTuple):
    """Per-sample quantities of every chain, filled as samples are accepted. A pytree.

    Attributes:
      values: (capacity, chains, Q) float32; rows past ``count`` are zero.
      count: () int32, samples per chain folded in so far.
    """

    values: jax.Array
    count: jax.Array

    @classmethod
    def empty(cls, capacity: int, chains: int, num_quantities: int) -> ChainTrace:
        """Room for ``capacity`` samples per chain of ``num_quantities`` quantities
        (``1 + K·C`` for ``sample_quantities``)."""
        return cls(
            jnp.zeros((capacity, chains, num_quantities), jnp.float32), jnp.zeros((), jnp.int32)
        )

    def add(self, quantities: jax.Array) -> ChainTrace:
        """Folds one sample per chain in; ``quantities``: (chains, Q). Samples past the
        capacity are dropped."""
        values = self.values.at[self.count].set(quantities.astype(jnp.float32), mode="drop")
        return ChainTrace(values, self.count + 1)

    def draws(self) -> np.ndarray:
        """(chains, S, Q) the folded samples, chain-major, as the diagnostics take them."""
        n = int(min(int(self.count), self.values.shape[0]))
        return np.swapaxes(np.asarray(self.values[:n], np.float64), 0, 1)


def chain_metrics(draws: np.ndarray) -> dict[str, float]:
    """``rhat``: the largest rank-normalised split-R̂ over the quantities (NaN, i.e. null
    in metrics.json, with one chain); ``ess`` and ``ess_tail``: the smallest bulk and tail
    ESS. All NaN with fewer than 4 samples per chain.

    Quantities that never change (e.g. a probability clipped at 1e-12 in every sample)
    carry no information about mixing and are left out.

    Args:
      draws: (chains, S, Q), e.g. ``ChainTrace.draws()`` or ``np.load(traces.npy)``.
    """
    draws = np.asarray(draws, np.float64)
    chains, s = draws.shape[:2]
    varying = np.ptp(draws.reshape(chains * s, -1), axis=0) > 0 if s else np.zeros(0, bool)
    x = draws[..., varying]
    out = {"rhat": math.nan, "ess": math.nan, "ess_tail": math.nan}
    if not x.shape[-1] or s < 4:
        return out
    out["ess"] = float(np.min(bulk_ess(x)))
    out["ess_tail"] = float(np.min(tail_ess(x)))
    if chains > 1:
        out["rhat"] = float(np.max(rank_rhat(x)))
    return out


def write_traces(out_dir: str | Path, summaries: dict) -> Path | None:
    """Writes ``traces.npy``, the test set's chain trace (chains, S, Q) float32 (Q = 1 + K·C:
    the test log-likelihood, then log p(c | x_i) input by input, class by class), the draws
    ``test/rhat`` and ``test/ess`` are computed from; atomically.

    Args:
      out_dir: the run folder.
      summaries: set name -> ``PredictiveSummary``; only the test set keeps a trace.

    Returns:
      The file, or None when the test summary has no trace (not a sampler).
    """
    test = summaries.get("test")
    if test is None or test.trace is None:
        return None
    path = Path(out_dir) / TRACES
    write_npy_atomic(path, test.trace.draws().astype(np.float32))
    return path
