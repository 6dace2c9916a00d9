"""The streaming predictive summary: what evaluation keeps of S members.

Every method ends in S members, each giving class probabilities for every
evaluation input. Evaluation never stores the (S, N, C) array: it folds each
chunk of members into per-input sums, so memory is O(N·C) whatever S is.
From these sums come the posterior predictive (soft voting), hard voting,
agreement, predictive variance and mutual information.

A fixed subset of inputs (``keep_idx``) also keeps every member's
probabilities, up to ``capacity`` members, for per-image box plots.

A sampler's test summary can also keep a ``ChainTrace`` (``diagnostics``): each
``add`` of one sample per chain then records the sample's test log-likelihood and
the log-probabilities of the kept inputs, for split-R̂, ESS and trace plots.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bnn_bench.evaluation.diagnostics import ChainTrace, sample_quantities

_TINY = 1e-12


class PredictiveSummary(NamedTuple):
    """Sums over members of per-input quantities. A pytree; jit- and scan-safe.

    Attributes:
      count: () float32, the number of members folded in (S).
      prob_sum: (N, C) sum over members of p_s(y | x).
      prob_sq_sum: (N, C) sum over members of p_s(y | x)^2.
      entropy_sum: (N,) sum over members of H[p_s(· | x)] (nats).
      votes: (N, C) int32, members whose argmax is each class.
      keep_idx: (K,) int32, the inputs whose member probabilities are kept.
      kept: (capacity, K, C) member probabilities of the kept inputs; rows past
        ``count`` are zero.
      labels: (N,) the set's labels when a trace is kept, else None.
      trace: a sampler's per-sample quantities (``ChainTrace``: every ``add`` is one
        sample of each chain), or None.
    """

    count: jax.Array
    prob_sum: jax.Array
    prob_sq_sum: jax.Array
    entropy_sum: jax.Array
    votes: jax.Array
    keep_idx: jax.Array
    kept: jax.Array
    labels: jax.Array | None = None
    trace: ChainTrace | None = None

    @classmethod
    def empty(
        cls,
        num_inputs: int,
        num_classes: int,
        keep_idx=(),
        capacity: int = 0,
        labels: jax.Array | None = None,
        chains: int | None = None,
        samples: int = 0,
    ) -> PredictiveSummary:
        """An empty summary for ``num_inputs`` inputs and ``num_classes`` classes.

        With ``labels`` (N,) and ``chains``, it also keeps a ``ChainTrace`` of up to
        ``samples`` samples per chain; then every ``add`` must be one sample per chain.
        """
        keep_idx = jnp.asarray(keep_idx, jnp.int32).reshape(-1)
        n, c = num_inputs, num_classes
        trace = None
        if labels is not None and chains is not None:
            labels = jnp.asarray(labels, jnp.int32)
            trace = ChainTrace.empty(samples, chains, 1 + keep_idx.shape[0] * c)
        return cls(
            count=jnp.zeros((), jnp.float32),
            prob_sum=jnp.zeros((n, c), jnp.float32),
            prob_sq_sum=jnp.zeros((n, c), jnp.float32),
            entropy_sum=jnp.zeros((n,), jnp.float32),
            votes=jnp.zeros((n, c), jnp.int32),
            keep_idx=keep_idx,
            kept=jnp.zeros((capacity, keep_idx.shape[0], c), jnp.float32),
            labels=labels if trace is not None else None,
            trace=trace,
        )

    @property
    def num_inputs(self) -> int:
        return self.prob_sum.shape[0]

    @property
    def num_classes(self) -> int:
        return self.prob_sum.shape[1]

    def add(self, probs: jax.Array) -> PredictiveSummary:
        """Folds a chunk of members in.

        Args:
          probs: (s, N, C) class probabilities of s members for all N inputs.
        """
        probs = jnp.asarray(probs, jnp.float32)
        s, c = probs.shape[0], probs.shape[-1]
        entropy = -jnp.sum(probs * jnp.log(jnp.clip(probs, _TINY)), axis=-1)  # (s, N)
        votes = jax.nn.one_hot(jnp.argmax(probs, axis=-1), c, dtype=jnp.int32).sum(0)
        kept = self.kept
        if kept.shape[0] and kept.shape[1]:
            rows = self.count.astype(jnp.int32) + jnp.arange(s)  # (s,)
            # Rows past capacity are dropped ("drop" mode), so kept stays bounded.
            kept = kept.at[rows].set(probs[:, self.keep_idx], mode="drop")
        trace = self.trace
        if trace is not None:  # one sample per chain: s = chains
            trace = trace.add(sample_quantities(probs, self.labels, self.keep_idx))
        return self._replace(
            count=self.count + s,
            prob_sum=self.prob_sum + probs.sum(0),
            prob_sq_sum=self.prob_sq_sum + jnp.square(probs).sum(0),
            entropy_sum=self.entropy_sum + entropy.sum(0),
            votes=self.votes + votes,
            kept=kept,
            trace=trace,
        )

    # Derived quantities. All are (N, C) or (N,).
    def mean(self) -> jax.Array:
        """(N, C) posterior predictive: the mean of the members' probabilities."""
        return self.prob_sum / jnp.maximum(self.count, 1.0)

    def variance(self) -> jax.Array:
        """(N, C) variance over members of each class probability (population, ddof 0)."""
        m = self.mean()
        return jnp.maximum(self.prob_sq_sum / jnp.maximum(self.count, 1.0) - m * m, 0.0)

    def std(self) -> jax.Array:
        """(N, C) standard deviation over members of each class probability: the
        members' spread (capsa's vote wrapper reports it)."""
        return jnp.sqrt(self.variance())

    def predictive_entropy(self) -> jax.Array:
        """(N,) entropy of the posterior predictive: total uncertainty."""
        m = self.mean()
        return -jnp.sum(m * jnp.log(jnp.clip(m, _TINY)), axis=-1)

    def expected_entropy(self) -> jax.Array:
        """(N,) mean over members of their entropies: aleatoric uncertainty."""
        return self.entropy_sum / jnp.maximum(self.count, 1.0)

    def mutual_information(self) -> jax.Array:
        """(N,) predictive entropy minus expected entropy: epistemic uncertainty."""
        return jnp.maximum(self.predictive_entropy() - self.expected_entropy(), 0.0)

    def hard_vote(self) -> jax.Array:
        """(N,) majority class over members; ties go to the lowest class index."""
        return jnp.argmax(self.votes, axis=-1)

    def agreement(self) -> jax.Array:
        """(N,) share of members voting for the majority class ("certainty")."""
        return self.votes.max(axis=-1) / jnp.maximum(self.count, 1.0)

    def kept_members(self) -> jax.Array:
        """(min(S, capacity), K, C) member probabilities of the kept inputs."""
        return self.kept[: int(min(self.count, self.kept.shape[0]))]


class EvalPlan(NamedTuple):
    """The evaluation sets, known before ``fit`` so samplers can fold members in as they go.

    Attributes:
      inputs: name -> (N, H, W, C) uint8 inputs (``test``, ``val``, OOD and shifted sets).
      keep: the first ``keep`` inputs of each set keep every member's probabilities.
      capacity: at most this many members are kept for them.
      labels: name -> (N,) labels of the labelled sets (the test set's feed a sampler's
        trace), or None.
    """

    inputs: dict[str, jax.Array]
    keep: int = 5
    capacity: int = 1000
    labels: dict[str, jax.Array | None] | None = None

    def empty(
        self, num_classes: int, chains: int | None = None, samples: int = 0
    ) -> dict[str, PredictiveSummary]:
        """One empty summary per evaluation set.

        A sampler passes its ``chains`` and accepted ``samples`` per chain: the test
        summary then keeps a ``ChainTrace`` (when the plan has the test labels), and
        each ``add`` to it must be one sample of every chain.
        """
        labels = self.labels or {}
        return {
            name: PredictiveSummary.empty(
                x.shape[0],
                num_classes,
                keep_idx=range(min(self.keep, x.shape[0])),
                capacity=self.capacity,
                labels=labels.get(name) if name == "test" else None,
                chains=chains,
                samples=samples,
            )
            for name, x in self.inputs.items()
        }
