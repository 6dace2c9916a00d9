"""``swag``: SWA-Gaussian (Maddox et al., 2019). S = ``covariance.members`` (1 for SWA).

From a MAP network (``PostHoc``: trained, or loaded with ``init_from``), SGD runs at a
constant learning rate (``method.sgd``) and the flat parameters θ_i are collected every
``collect_every`` steps. Their running moments and last K deviations give a Gaussian
N(θ̄, scale · (Σ_diag + D Dᵀ / (K − 1))), from which the ``covariance`` choice draws the
members (``swag_covariance.py``: the formulas, ``LowRank``, ``Diagonal``, ``SWA``).

Deviations measured against the mean of few iterates underestimate the covariance (≈ 0.86
of it with n = K = 20 collected, ≈ 1.02 with n = 2K; ``low_rank_fraction``). So by default
(``collect_every`` null) the SGD phase collects 2K iterates evenly over its steps (every
⌊steps / 2K⌋ steps, and after the last); fewer than 2K collected iterates are warned about.

A network with BatchNorm gets, for every member, statistics recomputed on
``bn_refresh_batches`` training batches (the average over batches of each layer's batch
mean and variance, as the authors' ``bn_update``), since running statistics collected
along the trajectory do not fit the averaged or sampled weights.

The SGD phase (``swag_sgd.py``) is the run's chunked loop ``swag``: it checkpoints the
optimiser state and the moments together and resumes where it stopped. Keys: the MAP
trains from the run's key (as ``method=map``); the SGD phase from ``fold_in(key, SGD_SALT)``
(``swag_sgd.py`` derives its batches and dropout keys), the BatchNorm refresh batches from
``fold_in(key, SGD_SALT + 1)``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import jax
from flax import struct
from jax.flatten_util import ravel_pytree

from bnn_bench.data import Dataset
from bnn_bench.errors import UserError
from bnn_bench.methods.base import RunContext, Work
from bnn_bench.methods.posthoc.base import PostHoc
from bnn_bench.methods.posthoc.mcbn import batch_norm_statistics
from bnn_bench.methods.posthoc.swag_covariance import (
    Covariance,
    LowRank,
    SWAGState,
    low_rank_fraction,
    swag_init,
    swag_rank,
)
from bnn_bench.methods.posthoc.swag_sgd import SGDCarry, SGDPhase, collection_steps, sgd_phase
from bnn_bench.methods.training import TrainState, epoch_batches
from bnn_bench.models import Model, Params, State

log = logging.getLogger(__name__)

SGD_SALT = 0x73776167  # "swag": the SGD phase runs on fold_in(key, SGD_SALT), apart from the MAP
_CHUNK = 10  # members drawn and evaluated together (bounds memory: (10, P) and (10, N, C))
BN_REFRESH_BATCHES = 20  # the default of method.bn_refresh_batches


# --------------------------------------------------------------- BatchNorm refresh


def refreshed_batch_stats(model: Model, params: Params, state: State, xb: jax.Array) -> dict:
    """BatchNorm statistics for ``params``: each layer's batch mean and unbiased variance
    averaged over the batches xb (nb, B, H, W, C), every layer fed by batch-normalised
    inputs (the authors' ``bn_update``: PyTorch's cumulative running statistics)."""
    stats = jax.lax.map(
        lambda x: batch_norm_statistics(model, params, state, x, unbiased_variance=True), xb
    )
    return jax.tree.map(lambda a: a.mean(0), stats)


# --------------------------------------------------------------- the method


@struct.dataclass
class SWAGPosterior:
    """The MAP network, the SWAG moments, and what a member needs.

    Attributes:
      params, state: the MAP network the SGD phase started from.
      swag: the moments of the collected iterates (flat parameters).
      unravel: flat (P,) -> parameter pytree.
      refresh_x: (nb, B, H, W, C) training batches for BatchNorm refresh, or None.
      info: ``swag/*``: iterates collected, rank K in use, SGD steps.
    """

    model: Model = struct.field(pytree_node=False)
    params: Params
    state: State
    swag: SWAGState
    unravel: Callable = struct.field(pytree_node=False)
    refresh_x: jax.Array | None = None
    info: dict[str, float] = struct.field(default_factory=dict)

    def network(self, theta: jax.Array) -> tuple[Params, State]:
        """``(params, state)`` for flat parameters θ (P,), BatchNorm statistics refreshed."""
        params = self.unravel(theta)
        if self.refresh_x is None:
            return params, self.state
        stats = refreshed_batch_stats(self.model, params, self.state, self.refresh_x)
        return params, {**self.state, "batch_stats": stats}


@dataclass(frozen=True, kw_only=True)
class SWAG(PostHoc):
    """SWA-Gaussian from a MAP start: constant-rate SGD, moments and rank-K deviations.

    Attributes:
      trainer, init_from: the MAP network the SGD phase starts from (``PostHoc``).
      sgd: the SGD phase (optimiser, constant rate, epochs, batch size).
      covariance: how members are drawn: ``LowRank`` (SWAG), ``Diagonal`` or ``SWA``.
      collect_every: SGD steps between collected iterates; None: 2K iterates evenly over
        the phase for ``LowRank`` (``steps // (2 rank)``), once per epoch for the others.
      bn_refresh_batches: training batches (of ``sgd.batch_size``) each member's
        BatchNorm statistics are recomputed on; a model without BatchNorm refuses
        another value than the default.
    """

    name: ClassVar = "swag"
    trains_after_map: ClassVar = True  # the SGD phase: dataset.augment applies to it

    sgd: SGDPhase = field(default_factory=SGDPhase)
    covariance: Covariance = field(default_factory=LowRank)
    collect_every: int | None = None
    bn_refresh_batches: int = BN_REFRESH_BATCHES

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.covariance, Covariance):
            raise UserError(
                f"method.covariance must be a choice of method/swag/covariance "
                f"(conf/method/swag/covariance/); got {self.covariance!r}."
            )
        if self.bn_refresh_batches < 1 or (
            self.collect_every is not None and self.collect_every < 1
        ):
            raise UserError("method.bn_refresh_batches and method.collect_every must be >= 1.")

    def collect_interval(self, n_train: int) -> int:
        """SGD steps between collected iterates on a training split of ``n_train`` inputs."""
        if self.collect_every is not None:
            return self.collect_every
        if self.covariance.rank:  # at least 2K iterates: see the module docstring
            return max(1, self.sgd.num_steps(n_train) // (2 * self.covariance.rank))
        return self.sgd.steps_per_epoch(n_train)

    def collections(self, n_train: int) -> int:
        """Iterates the SGD phase collects on a training split of ``n_train`` inputs."""
        total = self.sgd.num_steps(n_train)
        return len(collection_steps(total, self.collect_interval(n_train)))

    def check(self, model: Model, data: Dataset) -> None:
        """Refuses, before any training, what the run could not use."""
        super().check(model, data)
        n_train = data.train.size
        collected, need = self.collections(n_train), self.covariance.min_iterates
        if collected < need:
            raise UserError(
                f"SWAG's SGD phase collects {collected} iterate(s); the members need at "
                f"least {need}. Lower method.collect_every or raise method.sgd.epochs."
            )
        rank = self.covariance.rank
        if rank and collected < 2 * rank:
            # a warning, not a refusal: the estimate is defined, only narrower, and short
            # debugging runs need not collect 2K iterates
            log.warning(
                "SWAG collects %d iterates for method.covariance.rank=%d: the low-rank term "
                "is about %.2f of the covariance it estimates (independent iterates); collect "
                "at least 2 x rank = %d (raise method.sgd.epochs, lower method.collect_every) "
                "or lower method.covariance.rank.",
                collected,
                rank,
                low_rank_fraction(collected, rank),
                2 * rank,
            )
        if not model.has_batch_norm and self.bn_refresh_batches != BN_REFRESH_BATCHES:
            raise UserError(
                f"method.bn_refresh_batches={self.bn_refresh_batches}: model "
                f"{model.name or type(model.module).__name__} has no BatchNorm to refresh; "
                f"drop the key."
            )

    def fit_map(
        self,
        key: jax.Array,
        model: Model,
        data: Dataset,
        params: Params,
        state: State,
        ctx: RunContext,
    ) -> SWAGPosterior:
        """The SGD phase from the MAP network ``(params, state)`` and its moments."""
        n = data.train.size
        theta, unravel = ravel_pytree(params)
        tx = self.sgd.make_optimizer()
        start = SGDCarry(
            TrainState(params, state, tx.init(params)), swag_init(theta, self.covariance.rank)
        )
        # the phase's curves continue the MAP's: its step 1 is logged after the MAP's last
        offset = 0 if self.init_from is not None else self.trainer.num_steps(n)
        shifted = dataclasses.replace(ctx, log=lambda values, step: ctx.log(values, step + offset))
        k_sgd = jax.random.fold_in(key, SGD_SALT)
        moments = sgd_phase(
            k_sgd, model, data, self.sgd, start, self.collect_interval(n), shifted
        ).moments
        refresh_x = None
        if model.has_batch_norm:
            nb = min(self.bn_refresh_batches, self.sgd.steps_per_epoch(n))
            idx = epoch_batches(jax.random.fold_in(key, SGD_SALT + 1), n, self.sgd.batch_size)
            refresh_x = data.train.x[idx[:nb]]  # (nb, B, H, W, C)
        log.info("SWAG: %d iterates collected", int(moments.count))
        ctx.count(samples=self.covariance.members)
        return SWAGPosterior(
            model=model,
            params=params,
            state=state,
            swag=moments,
            unravel=unravel,
            refresh_x=refresh_x,
            info={
                "swag/collected": float(moments.count),
                "swag/rank": float(swag_rank(moments)),
                "swag/sgd_steps": float(self.sgd.num_steps(n)),
            },
        )

    def sample_thetas(self, key: jax.Array, posterior: SWAGPosterior) -> jax.Array:
        """The members' flat parameters (S, P)."""
        return self.covariance.draw(key, posterior.swag)

    def member_log_probs(
        self, key: jax.Array, posterior: SWAGPosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        """The ``covariance`` choice's members in chunks (s, N, C), drawn from ``key``."""
        thetas = self.sample_thetas(key, posterior)  # (S, P)
        for start in range(0, thetas.shape[0], _CHUNK):
            yield _member_probs(posterior, thetas[start : start + _CHUNK], x)

    def plan_map(self, model: Model, data: Dataset) -> Work:
        """The SGD phase's steps and gradient evaluations, its batch, and the members."""
        steps = self.sgd.num_steps(data.train.size)
        return Work(
            steps=steps,
            grad_evals=steps,
            members=self.covariance.members,
            batch_size=self.sgd.batch_size,
        )


@jax.jit
def _member_probs(post: SWAGPosterior, thetas: jax.Array, x: jax.Array) -> jax.Array:
    """(s, N, C) log-probabilities: the network of each θ of ``thetas`` (s, P) on x, one at
    a time."""

    def one(theta):
        params, state = post.network(theta)
        return post.model.log_probs(params, state, x)

    return jax.lax.map(one, thetas)
