"""The method contract: ``fit`` to a posterior, then members that give class probabilities.

Every method, however different inside, ends in S members, each giving class
probabilities for every evaluation input. ``predict`` folds them into one
``PredictiveSummary`` per evaluation set; evaluation never knows which method ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax

from bnn_bench.data import Dataset
from bnn_bench.evaluation.summary import EvalPlan, PredictiveSummary
from bnn_bench.models import Model

Posterior = Any  # a pytree; its model (static) rides along as a non-pytree field
LogFn = Callable[[dict[str, float], int], None]  # (values, step) -> None


def no_log(values: dict[str, float], step: int) -> None:
    del values, step


class Method(Protocol):
    """What ``run.py`` needs of a method."""

    def fit(
        self, key: jax.Array, model: Model, data: Dataset, plan: EvalPlan, log: LogFn = no_log
    ) -> Posterior:
        """Infers the posterior. ``plan`` lists the evaluation inputs (samplers fold
        members into them while sampling); ``log`` receives training curves."""
        ...

    def members(self, key: jax.Array, posterior: Posterior, x: jax.Array) -> Iterator[jax.Array]:
        """Yields class probabilities in chunks (s, N, C) for x (N, H, W, C) uint8; the
        chunk sizes add up to S. The same key gives the same members for any x."""
        ...

    def predict(
        self, key: jax.Array, posterior: Posterior, plan: EvalPlan
    ) -> dict[str, PredictiveSummary]:
        """One summary per evaluation set of ``plan``."""
        ...


# Optional hooks that run.py calls when present:
#   method.save(out_dir, posterior): write what a later run can reuse (MAP parameters
#     for init_from, SG-MCMC samples);
#   posterior.extra_metrics() -> {name: float}: numbers the method measured itself
#     (e.g. the prior precision Laplace chose, a sampler's last-sample accuracy);
#   method.extra_metrics(key, posterior, summaries, evalsets, num_bins) -> {name: float}:
#     numbers that need the evaluation sets (MC-BatchNorm's MAP prediction, each voter's).


class MemberMethod:
    """Base for methods whose members are produced on demand: ``predict`` streams
    ``members`` into the summaries, chunk by chunk, so memory stays O(N·C)."""

    def predict(
        self, key: jax.Array, posterior: Posterior, plan: EvalPlan
    ) -> dict[str, PredictiveSummary]:
        summaries = plan.empty(posterior.model.spec.num_classes)
        for name, x in plan.inputs.items():
            for probs in self.members(key, posterior, x):  # type: ignore[attr-defined]
                summaries[name] = summaries[name].add(probs)
        return summaries
