"""``map``: a point estimate (maximum a posteriori with the trainer's weight decay). S = 1."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import jax
from flax import struct

from bnn_bench.data import Dataset
from bnn_bench.evaluation.summary import EvalPlan
from bnn_bench.methods.base import LogFn, MemberMethod, no_log
from bnn_bench.methods.training import Trainer
from bnn_bench.models import Model, Params, State


@struct.dataclass
class PointPosterior:
    """A point estimate: one set of parameters and model state."""

    model: Model = struct.field(pytree_node=False)
    params: Params
    state: State


@dataclass(frozen=True)
class MAP(MemberMethod):
    """Trains one network with ``trainer``; its softmax is the single member.

    Attributes:
      trainer: optimiser, schedule and budget (the ``trainer`` config group).
    """

    trainer: Trainer

    def fit(self, key: jax.Array, model: Model, data: Dataset, plan: EvalPlan,
            log: LogFn = no_log) -> PointPosterior:
        del plan  # members are produced on demand
        ts = self.trainer.train(key, model, data, log)
        return PointPosterior(model=model, params=ts.params, state=ts.state)

    def members(self, key: jax.Array, posterior: PointPosterior,
                x: jax.Array) -> Iterator[jax.Array]:
        del key  # deterministic
        model = posterior.model
        yield jax.jit(model.probs)(posterior.params, posterior.state, x)[None]  # (1, N, C)
