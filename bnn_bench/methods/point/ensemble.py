"""``ensemble``: deep ensembles (Lakshminarayanan et al., 2017). S = ``members``.

p(y | x) ≈ (1/K) Σ_k softmax(f(x; θ_k)), each θ_k a MAP fit from its own random
initialisation and its own order of the full minibatches. The K networks train
together, vmapped in one compiled loop (``Trainer.train_members``).

Keys: member k trains from ``split(key, members)[k]`` exactly as ``method=map`` trains
from its key (``Trainer.train_members``), so a member is a MAP run of its own key
and runs of different seeds have different members.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import jax
import numpy as np
from flax import struct

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.likelihoods import Gaussian, target_scale
from bnn_bench.methods.base import Method, RunContext, Work
from bnn_bench.methods.training import Trainer
from bnn_bench.models import Model, Params, State


@struct.dataclass
class StackedPosterior:
    """K networks of one architecture: every leaf of ``params``/``state`` is (K, ...)."""

    model: Model = struct.field(pytree_node=False)
    params: Params
    state: State
    info: dict[str, float] = struct.field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(jax.tree.leaves(self.params)[0].shape[0])


def stacked_log_probs(posterior: StackedPosterior, x: jax.Array) -> jax.Array:
    """(K, N, C) evaluation-mode log-probabilities of every member for x (N, H, W, C) uint8."""
    fn = jax.jit(jax.vmap(posterior.model.log_probs, in_axes=(0, 0, None)))
    return fn(posterior.params, posterior.state, x)


def member_metrics(
    log_probs: jax.Array, labels: jax.Array, num_bins: int, prefix: str, model: Model | None = None
) -> dict[str, float]:
    """Each member's own accuracy, NLL and ECE: ``{prefix}member_<k>_{acc,nll,ece}``, and
    their means over members ``{prefix}member_mean_{acc,nll,ece}`` (regression, with
    ``model``'s Gaussian likelihood: ``rmse`` and ``nll``, the target's original units).

    Args:
      log_probs: (K, N, C) member log-probabilities, or (K, N, 2) Gaussian members.
      labels: (N,) integer labels, or standardised targets.
      model: the members' model (None: a classifier's).
    """
    out: dict[str, float] = {}
    if model is not None and isinstance(model.likelihood, Gaussian):
        lik, scale = model.likelihood, target_scale(model.spec)
        fns = [(k, lambda m, y, k=k: lik.point_metrics(m, y, scale)[k]) for k in ("rmse", "nll")]
    else:
        fns = [
            ("acc", lambda lp, y: M.accuracy(np.exp(lp), y)),
            ("nll", M.nll_of_log_probs),
            ("ece", lambda lp, y: M.ece(np.exp(lp), y, num_bins)),
        ]
    for name, fn in fns:
        values = [fn(lp, labels) for lp in np.asarray(log_probs, np.float64)]
        out |= {f"{prefix}member_{k}_{name}": v for k, v in enumerate(values)}
        out[f"{prefix}member_mean_{name}"] = float(sum(values) / len(values))
    return out


class StackedMethod(Method):
    """Members are K stacked networks (deep ensembles, voters): each member's log-probabilities,
    and each member's own metrics beside the ensemble's."""

    def member_log_probs(
        self, key: jax.Array, posterior: StackedPosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        del key  # deterministic
        yield stacked_log_probs(posterior, x)  # (K, N, C)

    def report(
        self, key: jax.Array, posterior: StackedPosterior, sets: dict[str, Split], num_bins: int
    ) -> dict[str, float]:
        """Each member's own metrics (``test/member_<k>_nll``, ``test/member_mean_nll``, ...):
        the single networks the ensemble is made of, measured in the same run."""
        del key
        out: dict[str, float] = {}
        for name, split in sets.items():
            lp = stacked_log_probs(posterior, split.x)
            out |= member_metrics(lp, split.y, num_bins, f"{name}/", posterior.model)
        return out


@dataclass(frozen=True)
class Ensemble(StackedMethod):
    """``members`` independently initialised MAP networks trained in parallel (vmapped).

    Attributes:
      trainer: optimiser, schedule and budget of every member (the ``trainer`` group).
      members: S, the number of networks.
    """

    trainer: Trainer
    members: int = 5

    def __post_init__(self):
        if self.members < 1:
            raise UserError(f"method.members must be >= 1; got {self.members}.")

    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> StackedPosterior:
        ctx = ctx or RunContext()
        keys = jax.random.split(key, self.members)
        ts = self.trainer.train_members(keys, model, data, ctx)
        ctx.count(samples=self.members)
        return StackedPosterior(model=model, params=ts.params, state=ts.state)

    def plan(self, model: Model, data: Dataset) -> Work:
        """Steps (of each member), gradient evaluations (of all), members, batch, networks.

        For ``dry_run``: counts the work of ``fit`` without doing it (``data`` may
        hold shapes only); ``check`` makes the refusals."""
        del model
        steps = self.trainer.num_steps(data.train.size)
        return Work(
            steps=steps,
            grad_evals=steps * self.members,
            members=self.members,
            batch_size=self.trainer.batch_size,
            networks=self.members,
        )
