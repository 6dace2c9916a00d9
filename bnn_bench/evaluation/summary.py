"""The streaming predictive summary: what evaluation keeps of S members.

Every method ends in S members, each giving class log-probabilities (the log-softmax of
its logits) for every evaluation input. Evaluation never stores the (S, N, C) array: it
folds each chunk of members into per-input sums, so memory is O(N·C) whatever S is.
From these sums come the posterior predictive (soft voting), hard voting,
agreement, predictive variance and mutual information. With the set's labels it also
keeps the log-likelihood of the mixture, log Σ_s p_s(y | x), as a running logsumexp of
the members' log-probabilities: exact where a probability underflows or lies below any
clipping floor (e.g. a single HMC sample's wrong answers at 1e-30).

A fixed subset of inputs (``keep_idx``) also keeps every member's
log-probabilities, up to ``capacity`` members, for per-image box plots and replays.

A sampler's test summary can also keep a ``ChainTrace`` (``diagnostics``): each
``add`` of one sample per chain then records the sample's test log-likelihood and
the log-probabilities of the kept inputs, for split-R̂, ESS and trace plots.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bnn_bench.evaluation.diagnostics import ChainTrace, sample_quantities

_TINY = 1e-12  # only for the entropy of the mean, whose log is of a sum of probabilities


class PredictiveSummary(NamedTuple):
    """Sums over members of per-input quantities. A pytree; jit- and scan-safe.

    Attributes:
      count: () float32, the number of members folded in (S).
      prob_sum: (N, C) sum over members of p_s(y | x).
      prob_sq_sum: (N, C) sum over members of p_s(y | x)^2.
      entropy_sum: (N,) sum over members of H[p_s(· | x)] (nats).
      votes: (N, C) int32, members whose argmax is each class.
      keep_idx: (K,) int32, the inputs whose member log-probabilities are kept.
      kept: (capacity, K, C) member log-probabilities of the kept inputs; rows past
        ``count`` are zero.
      labels: (N,) int32, the set's labels when known, else None.
      label_logp: (N,) float32 log Σ_s p_s(y | x) over the members so far (a running
        logsumexp; -inf before the first), when ``labels`` are known, else None.
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
    label_logp: jax.Array | None = None

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

        With ``labels`` (N,) it keeps the members' log-likelihood of them (``nll``); with
        ``chains`` as well, a ``ChainTrace`` of up to ``samples`` samples per chain, and
        then every ``add`` must be one sample per chain.
        """
        keep_idx = jnp.asarray(keep_idx, jnp.int32).reshape(-1)
        n, c = num_inputs, num_classes
        trace = label_logp = None
        if labels is not None:
            labels = jnp.asarray(labels, jnp.int32)
            label_logp = jnp.full((n,), -jnp.inf, jnp.float32)
            if chains is not None:
                trace = ChainTrace.empty(samples, chains, 1 + keep_idx.shape[0] * c)
        return cls(
            count=jnp.zeros((), jnp.float32),
            prob_sum=jnp.zeros((n, c), jnp.float32),
            prob_sq_sum=jnp.zeros((n, c), jnp.float32),
            entropy_sum=jnp.zeros((n,), jnp.float32),
            votes=jnp.zeros((n, c), jnp.int32),
            keep_idx=keep_idx,
            kept=jnp.zeros((capacity, keep_idx.shape[0], c), jnp.float32),
            labels=labels,
            trace=trace,
            label_logp=label_logp,
        )

    @property
    def num_inputs(self) -> int:
        return self.prob_sum.shape[0]

    @property
    def num_classes(self) -> int:
        return self.prob_sum.shape[1]

    def add(self, log_probs: jax.Array) -> PredictiveSummary:
        """Folds a chunk of members in.

        Args:
          log_probs: (s, N, C) class log-probabilities of s members for all N inputs
            (``jax.nn.log_softmax`` of their logits).
        """
        log_probs = jnp.asarray(log_probs, jnp.float32)
        probs = jnp.exp(log_probs)
        s, c = probs.shape[0], probs.shape[-1]
        # p log p -> 0 as p -> 0; the where also keeps a -inf log-probability finite here.
        entropy = -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)  # (s, N)
        votes = jax.nn.one_hot(jnp.argmax(log_probs, axis=-1), c, dtype=jnp.int32).sum(0)
        kept = self.kept
        if kept.shape[0] and kept.shape[1]:
            rows = self.count.astype(jnp.int32) + jnp.arange(s)  # (s,)
            # Rows past capacity are dropped ("drop" mode), so kept stays bounded.
            kept = kept.at[rows].set(log_probs[:, self.keep_idx], mode="drop")
        label_logp = self.label_logp
        if label_logp is not None:
            at_label = jnp.take_along_axis(log_probs, self.labels[None, :, None], axis=-1)
            label_logp = jnp.logaddexp(label_logp, jax.nn.logsumexp(at_label[..., 0], axis=0))
        trace = self.trace
        if trace is not None:  # one sample per chain: s = chains
            trace = trace.add(sample_quantities(log_probs, self.labels, self.keep_idx))
        return self._replace(
            count=self.count + s,
            prob_sum=self.prob_sum + probs.sum(0),
            prob_sq_sum=self.prob_sq_sum + jnp.square(probs).sum(0),
            entropy_sum=self.entropy_sum + entropy.sum(0),
            votes=self.votes + votes,
            kept=kept,
            trace=trace,
            label_logp=label_logp,
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

    def nll(self) -> jax.Array:
        """(N,) −log p̄(y | x) = log S − log Σ_s p_s(y | x), from the members'
        log-probabilities (no clipping). Needs the labels (``empty(labels=...)``)."""
        if self.label_logp is None:
            raise ValueError("PredictiveSummary.nll needs the labels: empty(..., labels=y).")
        return jnp.log(jnp.maximum(self.count, 1.0)) - self.label_logp

    def kept_log_members(self) -> jax.Array:
        """(min(S, capacity), K, C) member log-probabilities of the kept inputs."""
        return self.kept[: int(min(self.count, self.kept.shape[0]))]

    def kept_members(self) -> jax.Array:
        """(min(S, capacity), K, C) member probabilities of the kept inputs."""
        return jnp.exp(self.kept_log_members())


class EvalInputs(NamedTuple):
    """The evaluation sets, known before ``fit`` so samplers can fold members in as they go.

    Attributes:
      x: name -> (N, H, W, C) uint8 inputs (``test``, ``val``, OOD and shifted sets).
      keep: the first ``keep`` inputs of each set keep every member's probabilities.
      capacity: at most this many members are kept for them.
      labels: name -> (N,) labels of the labelled sets (None for ``ood``): their summaries
        keep the exact NLL, and the test set's feed a sampler's trace.
      summary: the summary type of the run's task, ``PredictiveSummary`` (classification)
        or ``RegressionSummary`` (``evaluation.tasks.task_of`` picks it from the data).
    """

    x: dict[str, jax.Array]
    keep: int = 5
    capacity: int = 1000
    labels: dict[str, jax.Array | None] | None = None
    summary: type = PredictiveSummary

    def empty(
        self, num_classes: int, chains: int | None = None, samples: int = 0
    ) -> dict[str, PredictiveSummary]:
        """One empty summary (of type ``summary``) per evaluation set.

        A labelled set's summary keeps the members' log-likelihood of its labels. A
        sampler passes its ``chains`` and accepted ``samples`` per chain: the test
        summary then keeps a ``ChainTrace`` (when ``labels`` has the test set's), and
        each ``add`` to it must be one sample of every chain.
        """
        labels = self.labels or {}
        return {
            name: self.summary.empty(
                x.shape[0],
                num_classes,
                keep_idx=range(min(self.keep, x.shape[0])),
                capacity=self.capacity,
                labels=labels.get(name),
                chains=chains if name == "test" else None,
                samples=samples,
            )
            for name, x in self.x.items()
        }
