"""``vote``: capsa's Vote wrapper. S = ``members``.

K voters (parameter sets of one architecture) train together, vmapped in one
compiled loop; each minibatch of ``trainer.batch_size`` is split into K
consecutive slices and voter k takes one optimiser step on slice k, so every
voter sees a disjoint 1/K of each batch. At prediction every voter sees every
input and the members are the voters.

The voters' spread (capsa calls it "risk"; bnn-bench keeps that word for selective
risk) is the std over voters of each class probability, Std_k[p_k(y = c | x)]
(``PredictiveSummary.std``), reported as ``member_std``.
Keys: ``k_voters, k_batches = split(key)``; voter k trains from
``split(k_voters, K)[k]`` (initialisation and dropout, as ``Trainer.train``
derives them) on batches drawn from ``k_batches``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation.summary import PredictiveSummary
from bnn_bench.methods.base import Need, RunContext, Work
from bnn_bench.methods.point.ensemble import StackedMethod, StackedPosterior, stacked_log_probs
from bnn_bench.methods.training import Trainer
from bnn_bench.models import Model


def member_std_metrics(summary: PredictiveSummary, prefix: str) -> dict[str, float]:
    """The voters' spread: the (N, C) std over voters of p(y = c | x), averaged over the
    inputs per class, ``{prefix}member_std_class_<c>``, and over classes and inputs,
    ``{prefix}member_std``."""
    spread = summary.std().mean(0)  # (C,)
    out = {f"{prefix}member_std_class_{c}": float(v) for c, v in enumerate(spread)}
    out[f"{prefix}member_std"] = float(spread.mean())
    return out


@dataclass(frozen=True)
class Vote(StackedMethod):
    """``members`` networks trained on disjoint slices of every batch; members = voters.

    Attributes:
      trainer: optimiser, schedule and budget; ``trainer.batch_size`` is the batch
        that is split among the voters, so it must be a multiple of ``members``.
      members: number of voters K.
    """

    needs: ClassVar = (
        Need(
            "categorical",
            True,
            "its voters vote on classes; method=ensemble is its regression form",
        ),
    )

    trainer: Trainer
    members: int = 8

    def __post_init__(self):
        if self.members < 1:
            raise UserError(f"method.members must be >= 1; got {self.members}.")
        b, k = self.trainer.batch_size, self.members
        if b % k:
            lo = max(k, b // k * k)
            raise UserError(
                f"trainer.batch_size={b} is not a multiple of method.members={k}: each "
                f"batch is split evenly among the voters. Use trainer.batch_size={lo} or "
                f"{lo + k}, or change method.members."
            )

    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> StackedPosterior:
        ctx = ctx or RunContext()
        k_voters, k_batches = jax.random.split(key)
        keys = jax.random.split(k_voters, self.members)
        ts = self.trainer.train_members(keys, model, data, ctx, shared_batches=k_batches)
        ctx.count(samples=self.members)
        return StackedPosterior(model=model, params=ts.params, state=ts.state)

    def report(
        self, key: jax.Array, posterior: StackedPosterior, sets: dict[str, Split], num_bins: int
    ) -> dict[str, float]:
        """The voters' spread on every evaluation set (``test/member_std_class_<c>``,
        ``test/member_std``) and
        each voter's own metrics (``test/member_<k>_{acc,nll,ece}``, ``test/member_mean_*``)."""
        out = super().report(key, posterior, sets, num_bins)
        for name, split in sets.items():
            log_probs = stacked_log_probs(posterior, split.x)  # (K, N, C), as ``predict`` folds
            summary = PredictiveSummary.empty(*log_probs.shape[1:]).add(log_probs)
            out |= member_std_metrics(summary, f"{name}/")
        return out

    def plan(self, model: Model, data: Dataset) -> Work:
        """Steps, gradient evaluations (one per voter and step, on its slice of the
        batch), members, each voter's batch, networks.

        For ``dry_run``: counts the work of ``fit`` without doing it (``data`` may
        hold shapes only); ``check`` makes the refusals."""
        del model
        steps = self.trainer.num_steps(data.train.size)
        return Work(
            steps=steps,
            grad_evals=steps * self.members,
            members=self.members,
            batch_size=self.trainer.batch_size // self.members,
            networks=self.members,
        )
