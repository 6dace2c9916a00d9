"""The template of every method that starts from a MAP network: ``PostHoc``.

Temperature scaling, MC dropout, MC-BatchNorm, SWAG and Laplace start from a MAP
network: trained with the ``trainer`` group from the run's key (so it is the network
``method=map`` trains with the same seed), or loaded from an earlier run's
``checkpoint/map.msgpack`` (``init_from``). ``PostHoc`` owns that step, and what follows
from it for every such method: it saves the MAP network for a later ``init_from``
(``save``), reports the MAP's own metrics beside the method's (``map/<set>/*``,
``report``), so one run shows the gain over the baseline, times the MAP step
(``time/map``) and counts its steps in the plan. A subclass writes only what it does
after the MAP: ``fit_map`` and ``plan_map`` (the work beyond the MAP), plus
``member_log_probs``.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import jax

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.methods.base import Method, Posterior, RunContext, Work
from bnn_bench.methods.point.map import checkpoint_path, load_point, map_metrics, save_point
from bnn_bench.methods.training import Trainer
from bnn_bench.models import Model, Params, State
from bnn_bench.reporting.outputs import read_metrics
from bnn_bench.run_folder import METRICS

log = logging.getLogger(__name__)


def map_point(
    key: jax.Array,
    model: Model,
    data: Dataset,
    trainer: Trainer,
    init_from: str | None,
    ctx: RunContext,
) -> tuple[Params, State]:
    """The MAP network's ``(params, state)``: loaded from ``init_from`` if given, else
    trained with ``trainer`` from ``key`` (the key ``method=map`` trains with), as the
    run context's loop ``trainer`` (checkpointed and resumed like a ``map`` run)."""
    tic = time.perf_counter()
    if init_from is not None:
        params, state = load_point(init_from, model)
        log.info("loaded MAP from %s", checkpoint_path(init_from))
        return params, state
    ts = trainer.train(key, model, data, ctx)
    log.info("trained MAP in %.1fs", time.perf_counter() - tic)
    return ts.params, ts.state


MAP_TIME = "time/map"  # the MAP step's seconds (training or loading), in every post-hoc run


@dataclass(frozen=True, kw_only=True)
class PostHoc(Method):
    """A method that starts from a MAP network (module docstring).

    Its posterior keeps the MAP network as ``params`` and ``state`` (what ``save`` writes
    and ``report`` measures).

    Attributes:
      trainer: trains the MAP network (ignored with ``init_from``).
      init_from: a run folder whose ``checkpoint/map.msgpack`` holds a network of the same
        model (written by every ``map`` and post-hoc run); None to train one.
    """

    trainer: Trainer
    init_from: str | None = None
    # whether the step after the MAP trains on minibatches (SWAG's SGD phase), which
    # dataset.augment then crops and flips; the other methods only evaluate the network
    trains_after_map: ClassVar[bool] = False

    def __post_init__(self):
        if self.init_from is not None:
            checkpoint_path(self.init_from)  # a missing checkpoint fails now, before any data

    def check(self, model: Model, data: Dataset) -> None:
        """``Method.check``, and with ``init_from`` a ``dataset.augment`` that would change
        nothing but the record: the loaded MAP was trained with the augmentation its run
        folder's metrics.json records (``data/augment``), and a method that trains nothing
        after it must say the same (the fidelity fingerprint records it)."""
        super().check(model, data)
        if self.init_from is None or self.trains_after_map:
            return
        metrics = Path(self.init_from) / METRICS
        theirs = False  # a run from before augmentation existed, or without metrics.json
        if metrics.is_file():
            theirs = bool(read_metrics(self.init_from).get("data/augment", 0.0))
        if bool(data.spec.augment) != theirs:
            name = self.name or type(self).__name__.lower()
            ours, was = str(bool(data.spec.augment)).lower(), str(theirs).lower()
            raise UserError(
                f"dataset.augment={ours}: method={name} loads its MAP network from "
                f"init_from={self.init_from}, trained with dataset.augment={was} ({metrics}), "
                f"and trains nothing after it, so augmentation would change only this run's "
                f"record. Set dataset.augment={was}, or point init_from at a MAP run trained "
                f"with dataset.augment={ours}."
            )

    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> Posterior:
        """Checks, trains or loads the MAP network, then ``fit_map``."""
        ctx = ctx or RunContext()
        self.check(model, data)  # before training
        tic = time.perf_counter()
        params, state = map_point(key, model, data, self.trainer, self.init_from, ctx)
        seconds = time.perf_counter() - tic
        posterior = self.fit_map(key, model, data, params, state, ctx)
        return posterior.replace(info={**posterior.info, MAP_TIME: seconds})

    @abc.abstractmethod
    def fit_map(
        self,
        key: jax.Array,
        model: Model,
        data: Dataset,
        params: Params,
        state: State,
        ctx: RunContext,
    ) -> Posterior:
        """The method's own inference from the MAP network ``(params, state)``."""

    def plan(self, model: Model, data: Dataset) -> Work:
        """The MAP's steps (0 with ``init_from``) plus ``plan_map``'s."""
        own = self.plan_map(model, data)
        steps = 0 if self.init_from else self.trainer.num_steps(data.train.size)
        return Work(
            steps=steps + own.steps,
            grad_evals=steps + own.grad_evals,
            members=own.members,
            batch_size=own.batch_size if own.steps else self.trainer.batch_size,
            networks=own.networks,
        )

    @abc.abstractmethod
    def plan_map(self, model: Model, data: Dataset) -> Work:
        """The work after the MAP: its own steps and gradient evaluations (often 0), and
        the members; ``batch_size`` counts only if it takes steps."""

    def save(self, out_dir, posterior: Posterior):
        """Writes the MAP network, so a later run can reuse it with ``init_from``."""
        return save_point(out_dir, posterior.params, posterior.state)

    def report(
        self, key: jax.Array, posterior: Posterior, sets: dict[str, Split], num_bins: int
    ) -> dict[str, float]:
        """The MAP network the method started from: ``map/<set>/{acc,nll,ece,brier}``."""
        del key
        return map_metrics(posterior.model, posterior.params, posterior.state, sets, num_bins)
