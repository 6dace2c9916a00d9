"""Sampler diagnostics: split-R̂ and effective sample size of per-sample quantities.

A multi-chain sampler (SG-MCMC, HMC) folds, for every accepted sample of every
chain, a few scalar quantities of the sample into a ``ChainTrace`` while it
samples (the trace is a pytree, safe inside ``jit`` and ``lax.scan``):

- the test log-likelihood of the sample, mean_n log p(y_n | x_n, θ_s);
- the log-probabilities log p(c | x_i, θ_s) of a few fixed test inputs (the
  summary's kept inputs, ``eval.keep_inputs``), every class: the sample's logits up
  to their per-input shift (logits themselves are only identified up to that shift).

A sampler gets this by asking its evaluation plan for summaries with a trace,
``plan.empty(num_classes, chains=C, samples=S)``, and folding one sample of every
chain per ``add`` (``PredictiveSummary.add``), as it does anyway.

After sampling, ``chain_metrics`` gives ``test/rhat`` (the largest split-R̂ over
the quantities; null with one chain) and ``test/ess`` (the smallest effective
sample size), computed with ``blackjax.diagnostics``: split-R̂ is BlackJAX's
``potential_scale_reduction`` on chains split in halves (Gelman et al., BDA3,
§11.4); ESS is its ``effective_sample_size`` (Geyer's initial monotone sequence
over all chains, as Stan). ``plots.traces`` draws the log-likelihood traces.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnn_bench.evaluation import metrics as M
from bnn_bench.reporting.outputs import write_npy_atomic

TRACES = "traces.npy"  # in the run folder: the test set's (chains, S, Q) draws


def split_chains(x: np.ndarray) -> np.ndarray:
    """Halves of each chain as chains: (chains, S, ...) -> (2·chains, ⌊S/2⌋, ...); the
    middle sample of an odd S is dropped (as Stan and ArviZ)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)


def split_rhat(x) -> np.ndarray:
    """Split-R̂ of each quantity.

    Args:
      x: (chains, S) or (chains, S, Q) draws, S >= 4.

    Returns:
      () or (Q,) split-R̂; near 1 when the chains' halves agree, ≫ 1 when the
      chains sit in different places or drift.
    """
    x = np.asarray(x, np.float64)
    from blackjax import diagnostics as bd  # importing blackjax starts JAX's backend

    return np.asarray(bd.potential_scale_reduction(split_chains(x), chain_axis=0, sample_axis=1))


def effective_sample_size(x) -> np.ndarray:
    """Effective sample size over all chains of each quantity.

    Args:
      x: (chains, S) or (chains, S, Q) draws, S >= 2.

    Returns:
      () or (Q,) ESS: chains·S for independent draws, less when they are correlated.
    """
    x = np.asarray(x, np.float64)
    from blackjax import diagnostics as bd

    return np.asarray(bd.effective_sample_size(x, chain_axis=0, sample_axis=1))


def sample_quantities(probs: jax.Array, labels: jax.Array, inputs) -> jax.Array:
    """The tracked quantities of one sample per chain. Jittable.

    Args:
      probs: (chains, N, C) test-set class probabilities of each chain's sample.
      labels: (N,) test labels.
      inputs: (K,) indices of the fixed test inputs whose log-probabilities are tracked.

    Returns:
      (chains, 1 + K·C): the test log-likelihood, then log p(c | x_i) for the K inputs
      i, every class c.
    """
    loglik = -jax.vmap(lambda p: M.nll(p, labels, xp=jnp))(probs)  # (chains,)
    logp = jnp.log(jnp.clip(probs[:, jnp.asarray(inputs, jnp.int32)], 1e-12))  # (chains, K, C)
    return jnp.concatenate([loglik[:, None], logp.reshape(probs.shape[0], -1)], axis=1)


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
    """``rhat``: the largest split-R̂ over the quantities (NaN, i.e. null in
    metrics.json, with one chain or fewer than 4 samples per chain); ``ess``: the
    smallest ESS (NaN with fewer than 2 samples).

    Quantities that never change (e.g. a probability clipped at 1e-12 in every sample)
    carry no information about mixing and are left out.

    Args:
      draws: (chains, S, Q), e.g. ``ChainTrace.draws()``.
    """
    chains, s = draws.shape[:2]
    varying = np.ptp(draws.reshape(chains * s, -1), axis=0) > 0 if s else np.zeros(0, bool)
    x = draws[..., varying]
    rhat = ess = math.nan
    if x.shape[-1] and s >= 2:
        ess = float(np.min(effective_sample_size(x)))
    if x.shape[-1] and chains > 1 and s >= 4:
        rhat = float(np.max(split_rhat(x)))
    return {"rhat": rhat, "ess": ess}


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
