"""The regression summary: what evaluation keeps of S members of a Gaussian likelihood.

A regression member gives, for every evaluation input, a Gaussian over the target: its mean
and log σ in standardised target units, (s, N, 2) a chunk (``Gaussian.member``). The
predictive is the equally weighted mixture of the members' Gaussians, whose NLL, CRPS and
interval ends need every member, so the summary keeps them all (regression test sets are
small: 1,000 members of 1,000 inputs are 8 MB) up to ``capacity`` members
(``eval.keep_members``); members past it are dropped and the evaluation says so in the log.

It plays the role of ``PredictiveSummary`` for regression: the same ``empty`` (called
through ``EvalInputs.empty``), ``add``, ``count`` and ``trace``, so methods and samplers
fold members into it without knowing the task. A sampler's test summary keeps a
``ChainTrace`` of each sample's test log-likelihood and the (mean, log σ) of the kept
inputs, for ``test/rhat`` and ``test/ess``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnn_bench.evaluation.diagnostics import ChainTrace

_HALF_LOG_2PI = 0.5 * float(np.log(2 * np.pi))


def regression_quantities(members: jax.Array, labels: jax.Array, inputs) -> jax.Array:
    """The traced quantities of one sample per chain (jittable).

    Args:
      members: (chains, N, 2) standardised (mean, log σ) of each chain's sample.
      labels: (N,) standardised targets.
      inputs: (K,) indices of the tracked inputs.

    Returns:
      (chains, 1 + 2K): the mean test log-likelihood log N(y; mean, σ²) (standardised
      units: R̂ and ESS do not see the constant shift to original units), then the mean and
      log σ of the K inputs.
    """
    mean, log_sd = members[..., 0], members[..., 1]
    z = (labels[None, :] - mean) * jnp.exp(-log_sd)
    loglik = jnp.mean(-0.5 * z**2 - log_sd - _HALF_LOG_2PI, axis=-1)  # (chains,)
    kept = members[:, jnp.asarray(inputs, jnp.int32)]  # (chains, K, 2)
    return jnp.concatenate([loglik[:, None], kept.reshape(members.shape[0], -1)], axis=1)


class RegressionSummary(NamedTuple):
    """Every member's Gaussian on every input of one evaluation set. A pytree; jit-safe.

    Attributes:
      count: () float32, the members folded in (S), kept or not.
      members: (capacity, N, 2) float32 standardised (mean, log σ) of the first
        ``capacity`` members; rows past ``count`` are zero.
      keep_idx: (K,) int32, the inputs a sampler's trace follows.
      labels: (N,) float32 standardised targets when known, else None.
      trace: a sampler's per-sample quantities (``ChainTrace``), or None.
    """

    count: jax.Array
    members: jax.Array
    keep_idx: jax.Array
    labels: jax.Array | None = None
    trace: ChainTrace | None = None

    @classmethod
    def empty(
        cls,
        num_inputs: int,
        num_classes: int = 2,
        keep_idx=(),
        capacity: int = 1000,
        labels: jax.Array | None = None,
        chains: int | None = None,
        samples: int = 0,
    ) -> RegressionSummary:
        """An empty summary for ``num_inputs`` inputs; the signature of
        ``PredictiveSummary.empty``, so ``EvalInputs.empty`` calls either.

        Args:
          num_classes: the members' width (``Likelihood.member_width``): 2, (μ, log σ) of
            one target; the name is ``PredictiveSummary.empty``'s.
          capacity: members kept (``eval.keep_members``).
          labels, chains, samples: with all three, a ``ChainTrace`` of up to ``samples``
            samples per chain (every ``add`` is then one sample per chain).
        """
        if num_classes != 2:
            raise ValueError(
                f"RegressionSummary keeps (μ, log σ) of one target; got {num_classes}."
            )
        keep_idx = jnp.asarray(keep_idx, jnp.int32).reshape(-1)
        trace = None
        if labels is not None:
            labels = jnp.asarray(labels, jnp.float32)
            if chains is not None:
                trace = ChainTrace.empty(samples, chains, 1 + 2 * keep_idx.shape[0])
        return cls(
            count=jnp.zeros((), jnp.float32),
            members=jnp.zeros((capacity, num_inputs, 2), jnp.float32),
            keep_idx=keep_idx,
            labels=labels,
            trace=trace,
        )

    @property
    def num_inputs(self) -> int:
        return self.members.shape[1]

    @property
    def capacity(self) -> int:
        return self.members.shape[0]

    def add(self, members: jax.Array) -> RegressionSummary:
        """Folds a chunk of members in.

        Args:
          members: (s, N, 2) standardised (mean, log σ) of s members for all N inputs.
        """
        members = jnp.asarray(members, jnp.float32)
        rows = self.count.astype(jnp.int32) + jnp.arange(members.shape[0])  # (s,)
        buf = self.members.at[rows].set(members, mode="drop")  # past capacity: dropped
        trace = self.trace
        if trace is not None:  # one sample per chain: s = chains
            trace = trace.add(regression_quantities(members, self.labels, self.keep_idx))
        return self._replace(count=self.count + members.shape[0], members=buf, trace=trace)

    def kept(self) -> int:
        """How many members are kept: min(S, capacity)."""
        return int(min(float(self.count), self.capacity))

    def member_outputs(self) -> np.ndarray:
        """(min(S, capacity), N, 2) standardised (mean, log σ) of the kept members."""
        return np.asarray(self.members[: self.kept()])

    def kept_log_members(self) -> jax.Array:
        """(min(S, capacity), K, 2) the kept members on the ``keep_idx`` inputs: what a
        sampler's ``replay`` reads (as ``PredictiveSummary.kept_log_members``)."""
        return self.members[: self.kept()][:, self.keep_idx]
