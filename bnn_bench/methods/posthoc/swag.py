"""``swag``: SWA-Gaussian (Maddox et al., 2019). S = ``covariance.num_samples`` (1 for SWA).

From a MAP network, SGD runs at a constant learning rate (``method.sgd``) and the flat
parameters θ_i are collected every ``collect_every`` steps. With n iterates:

    θ̄ = (1/n) Σ θ_i,   Σ_diag = diag((1/n) Σ θ_i²  −  θ̄²),   D = [θ_i − θ̄_i]  (the last K),
    θ ~ N(θ̄, scale · (Σ_diag + D Dᵀ / (K − 1)))

θ̄_i is the running mean right after collecting θ_i (§3.3 of the paper and the authors'
``SWAG.collect_model``); K is the number of deviation columns kept (at most
``covariance.rank``; the authors divide by ``max_num_models`` − 1 even before that many
are collected). A draw is (the authors' ``sample_fullrank``)

    θ = θ̄ + √scale · (Σ_diag^{1/2} z₁ + D z₂ / √(K − 1)),   z₁ ~ N(0, I_P), z₂ ~ N(0, I_K).

``scale`` = ½ is the paper's SWAG, ½(Σ_diag + D Dᵀ/(K − 1)), and the authors' ``--scale=0.5``.

Early deviations are measured against the mean of few iterates: for i.i.d. iterates
E[(θ_i − θ̄_i)(θ_i − θ̄_i)ᵀ] = (1 − 1/i) Σ, so with n = K = 20 collected (the first column
is 0) the low-rank term is Σ_{i≤20}(1 − 1/i)/19 ≈ 0.86 of the covariance it estimates, and
with n = 2K ≈ 1.02. So by default (``collect_every`` null) the SGD phase collects 2K
iterates evenly over its steps (every ⌊steps / 2K⌋ steps, and after the last); fewer than
2K collected iterates are warned about.

The ``covariance`` choice (``conf/method/swag/covariance/``) picks the members:
``low_rank`` (SWAG, the formula above), ``diagonal`` (SWAG-Diagonal,
N(θ̄, scale · Σ_diag); scale 1 is the paper's §3.2) or ``swa`` (one member at θ̄: SWA,
Izmailov et al., 2018). A network with BatchNorm
gets, for every member, statistics recomputed on ``bn_refresh_batches`` training
batches (the average over batches of each layer's batch mean and variance, as the
authors' ``bn_update``), since running statistics collected along the trajectory do
not fit the averaged or sampled weights.

The SGD phase is the run's chunked loop ``swag`` (``methods/loop.py``): it checkpoints
the optimiser state and the moments together and resumes where it stopped. Keys: the
MAP trains from the run's key (as ``method=map``); the SGD phase from
``fold_in(key, SGD_SALT)``: ``k_data, k_drop = split(...)``, one permutation per epoch
from ``fold_in(k_data, epoch)`` and the dropout key of step t ``fold_in(k_drop, t)``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.methods.base import Method, RunContext, Work
from bnn_bench.methods.loop import Divergence, chunked_loop, chunks_of
from bnn_bench.methods.map import checkpoint_path, map_metrics, save_point
from bnn_bench.methods.posthoc import map_point
from bnn_bench.methods.posthoc.mcbn import batch_norm_statistics
from bnn_bench.methods.training import Trainer, TrainState, epoch_batches, make_chunk_runner
from bnn_bench.models import Model, Params, State

log = logging.getLogger(__name__)

SGD_SALT = 0x73776167  # "swag": the SGD phase runs on fold_in(key, SGD_SALT), apart from the MAP
_VAR_FLOOR = 1e-30  # Σ_diag can round below zero where θ barely moved
_CHUNK = 10  # members drawn and evaluated together (bounds memory: (10, P) and (10, N, C))
BN_REFRESH_BATCHES = 20  # the default of method.bn_refresh_batches


# --------------------------------------------------------------- moments (pure)


class SWAGState(NamedTuple):
    """The running moments of the collected iterates and the last ``rank`` deviations.

    Attributes:
      count: () int32, iterates collected (n).
      mean: (P,) θ̄, the mean of the iterates.
      sq_mean: (P,) the mean of their squares.
      deviations: (rank, P) ring buffer: row (i mod rank) holds θ_i − θ̄_i of iterate i
        (0-based); rows not yet written are zero. rank may be 0 (no deviations kept).
    """

    count: jax.Array
    mean: jax.Array
    sq_mean: jax.Array
    deviations: jax.Array


def swag_init(theta: jax.Array, rank: int) -> SWAGState:
    """An empty ``SWAGState`` for flat parameters like ``theta`` (P,).

    >>> s = swag_collect(swag_init(jnp.zeros(2), rank=2), jnp.array([1.0, 3.0]))
    >>> s = swag_collect(s, jnp.array([3.0, 5.0]))
    >>> s.mean.tolist(), s.deviations.tolist()
    ([2.0, 4.0], [[0.0, 0.0], [1.0, 1.0]])
    """
    z = jnp.zeros_like(theta)
    return SWAGState(jnp.zeros((), jnp.int32), z, z, jnp.zeros((rank, *theta.shape), theta.dtype))


def swag_collect(state: SWAGState, theta: jax.Array) -> SWAGState:
    """Folds one iterate θ (P,) into the moments and the deviation buffer. Jittable."""
    n = state.count + 1
    mean = state.mean + (theta - state.mean) / n
    sq_mean = state.sq_mean + (jnp.square(theta) - state.sq_mean) / n
    rank = state.deviations.shape[0]
    deviations = state.deviations
    if rank:
        deviations = deviations.at[state.count % rank].set(theta - mean)
    return SWAGState(n, mean, sq_mean, deviations)


def swag_diag_variance(state: SWAGState) -> jax.Array:
    """(P,) Σ_diag = E[θ²] − θ̄², floored at a tiny positive number."""
    return jnp.maximum(state.sq_mean - jnp.square(state.mean), _VAR_FLOOR)


def swag_rank(state: SWAGState) -> jax.Array:
    """() K, the deviation columns in use: min(count, rank)."""
    return jnp.minimum(state.count, state.deviations.shape[0])


def swag_sample(
    key: jax.Array, state: SWAGState, scale: float, diag_only: bool = False
) -> jax.Array:
    """One θ (P,) from N(θ̄, scale · (Σ_diag + D Dᵀ/(K − 1))), or N(θ̄, scale · Σ_diag) if
    ``diag_only``: θ̄ + √scale · (Σ_diag^{1/2} z₁ + D z₂/√(K − 1)), as the authors' code.

    Needs K ≥ 2 collected iterates unless ``diag_only``. Jittable.
    """
    k1, k2 = jax.random.split(key)
    noise = jnp.sqrt(swag_diag_variance(state)) * jax.random.normal(
        k1, state.mean.shape, state.mean.dtype
    )
    if not diag_only:
        rank = state.deviations.shape[0]
        k = swag_rank(state)
        z2 = jax.random.normal(k2, (rank,), state.mean.dtype) * (jnp.arange(rank) < k)
        noise = noise + (z2 @ state.deviations) / jnp.sqrt(k - 1.0)
    return state.mean + jnp.sqrt(scale) * noise


def swag_covariance(state: SWAGState, scale: float, diag_only: bool = False) -> jax.Array:
    """(P, P) the dense covariance ``swag_sample`` draws from (tiny models and tests):
    scale · (Σ_diag + D Dᵀ/(K − 1)), or scale · Σ_diag if ``diag_only``."""
    cov = jnp.diag(swag_diag_variance(state))
    if not diag_only:
        rank = state.deviations.shape[0]
        d = state.deviations * (jnp.arange(rank) < swag_rank(state))[:, None]  # (rank, P)
        cov = cov + (d.T @ d) / (swag_rank(state) - 1.0)
    return scale * cov


def low_rank_fraction(n: int, rank: int) -> float:
    """E[D Dᵀ/(K − 1)] / Σ for n i.i.d. iterates of covariance Σ and K = min(n, rank)
    columns: Σ_{i=n−K+1..n} (1 − 1/i) / (K − 1), since Var(θ_i − θ̄_i) = (1 − 1/i) Σ.

    >>> round(low_rank_fraction(20, 20), 3), round(low_rank_fraction(40, 20), 3)
    (0.863, 1.017)
    """
    k = min(n, rank)
    return sum(1 - 1 / i for i in range(n - k + 1, n + 1)) / (k - 1)


# --------------------------------------------------------------- covariance choices


class Covariance(abc.ABC):
    """How members are drawn from the moments (``conf/method/swag/covariance/``)."""

    @property
    def rank(self) -> int:
        """Deviation columns the SGD phase keeps (0: none needed)."""
        return 0

    @property
    def min_iterates(self) -> int:
        """Collected iterates the members need."""
        return 1

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """S, the number of members."""

    @abc.abstractmethod
    def draw(self, key: jax.Array, moments: SWAGState) -> jax.Array:
        """The members' flat parameters (S, P); member s from ``fold_in(key, s)``."""


def _check_samples(num_samples: int, scale: float) -> None:
    if num_samples < 1:
        raise UserError(f"method.covariance.num_samples must be >= 1; got {num_samples}.")
    if not scale > 0:
        raise UserError(
            f"method.covariance.scale must be > 0; got {scale} (one member at the mean is "
            f"method/swag/covariance=swa)."
        )


@dataclass(frozen=True)
class LowRank(Covariance):
    """SWAG: N(θ̄, scale · (Σ_diag + D Dᵀ/(K − 1))) from the last ``rank`` deviations.

    Attributes:
      rank: K, the deviation columns kept (the last K iterates; >= 2). The SGD phase should
        collect at least 2K iterates (see the module docstring); fewer are warned about.
      num_samples: members S.
      scale: the factor on the covariance (√scale on the noise); ½ is the paper's SWAG.
    """

    rank: int = 20
    num_samples: int = 30
    scale: float = 0.5

    def __post_init__(self):
        _check_samples(self.num_samples, self.scale)
        if self.rank < 2:
            raise UserError(
                f"method.covariance.rank={self.rank}: the low-rank term D Dᵀ/(K − 1) needs "
                f"K >= 2; raise it, or choose method/swag/covariance=diagonal."
            )

    @property
    def min_iterates(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return self.num_samples

    def draw(self, key: jax.Array, moments: SWAGState) -> jax.Array:
        ids = jnp.arange(self.num_samples)
        return jax.vmap(lambda s: swag_sample(jax.random.fold_in(key, s), moments, self.scale))(ids)


@dataclass(frozen=True)
class Diagonal(Covariance):
    """SWAG-Diagonal: N(θ̄, scale · Σ_diag).

    Attributes:
      num_samples: members S.
      scale: the factor on the covariance; 1 is the paper's §3.2 SWAG-Diagonal, ½ (the
        default) makes it SWAG without the low-rank term.
    """

    num_samples: int = 30
    scale: float = 0.5

    def __post_init__(self):
        _check_samples(self.num_samples, self.scale)

    @property
    def size(self) -> int:
        return self.num_samples

    def draw(self, key: jax.Array, moments: SWAGState) -> jax.Array:
        ids = jnp.arange(self.num_samples)
        return jax.vmap(
            lambda s: swag_sample(jax.random.fold_in(key, s), moments, self.scale, diag_only=True)
        )(ids)


@dataclass(frozen=True)
class SWA(Covariance):
    """SWA (Izmailov et al., 2018): one member at the mean θ̄."""

    @property
    def size(self) -> int:
        return 1

    def draw(self, key: jax.Array, moments: SWAGState) -> jax.Array:
        del key
        return moments.mean[None]


# --------------------------------------------------------------- SGD phase


@dataclass(frozen=True)
class SGDPhase:
    """SWAG's SGD phase: a constant learning rate from the MAP network (``method.sgd``).

    Attributes:
      optimizer: an optax optimiser waiting for its learning rate (``optax.sgd`` with
        ``_partial_: true``); the phase passes ``learning_rate``.
      learning_rate: the constant rate.
      l2: coupled weight decay: l2 · θ is added to the gradient (as ``trainer.l2``).
      epochs: passes over the training split.
      batch_size: minibatch size.
      chunk_size: steps per compiled ``lax.scan`` call (progress bar and checkpoints);
        a chunk also ends at every collection and every epoch's end.
    """

    optimizer: Callable[..., optax.GradientTransformation] = partial(optax.sgd, momentum=0.9)
    learning_rate: float = 0.04
    l2: float = 5e-4
    epochs: int = 20
    batch_size: int = 128
    chunk_size: int = 200

    def __post_init__(self):
        if not callable(self.optimizer):
            raise UserError(
                f"method.sgd.optimizer must be an optax optimiser node (_target_: optax.sgd, "
                f"_partial_: true); got {self.optimizer!r}."
            )
        if not self.learning_rate > 0 or self.l2 < 0:
            raise UserError("method.sgd.learning_rate must be > 0 and method.sgd.l2 >= 0.")
        if min(self.epochs, self.batch_size, self.chunk_size) < 1:
            raise UserError("method.sgd.epochs, batch_size and chunk_size must be >= 1.")

    def steps_per_epoch(self, n: int) -> int:
        if self.batch_size > n:
            raise UserError(
                f"method.sgd.batch_size={self.batch_size} is larger than the training "
                f"split ({n} examples); lower it."
            )
        return n // self.batch_size

    def num_steps(self, n: int) -> int:
        return self.epochs * self.steps_per_epoch(n)

    def make_optimizer(self) -> optax.GradientTransformation:
        """``optimizer(learning_rate)``, after the coupled ``l2`` decay if any."""
        tx = self.optimizer(learning_rate=self.learning_rate)
        return optax.chain(optax.add_decayed_weights(self.l2), tx) if self.l2 else tx


class SGDCarry(NamedTuple):
    """The SGD phase between chunks (what its checkpoint holds): the optimiser's train
    state and the moments of the iterates collected so far."""

    ts: TrainState
    moments: SWAGState


def collection_steps(total: int, every: int) -> list[int]:
    """The steps after which an iterate is collected: every ``every``-th, and the last."""
    return sorted({*range(every, total + 1, every), total})


def sgd_phase(
    key: jax.Array,
    model: Model,
    data: Dataset,
    sgd: SGDPhase,
    start: SGDCarry,
    collect_every: int,
    ctx: RunContext,
) -> SGDCarry:
    """Runs ``sgd`` from ``start`` and folds the parameters after every collection step
    into the moments; the run context's chunked loop ``swag`` (checkpoint and resume).

    Args:
      key: the phase's key (``fold_in(run key, SGD_SALT)``).
      start: the MAP network with a fresh optimiser state, and empty moments.
      collect_every: steps between collections.
      ctx: the run context; each chunk's values are logged at the phase's step.

    Returns:
      The carry after the last step.
    """
    n = data.train.size
    per_epoch, total = sgd.steps_per_epoch(n), sgd.num_steps(n)
    collect_at = set(collection_steps(total, collect_every))
    stops = sorted(collect_at | set(range(per_epoch, total + 1, per_epoch)))
    chunks = [
        c
        for lo, hi in zip([0, *stops[:-1]], stops, strict=True)
        for c in chunks_of(lo, hi, sgd.chunk_size)
    ]
    length = max(hi - lo for lo, hi in chunks)  # every chunk is padded to it: one compile
    run_chunk = make_chunk_runner(model, sgd.make_optimizer())
    k_data, k_drop = jax.random.split(key)
    batches = functools.lru_cache(maxsize=1)(
        lambda e: epoch_batches(jax.random.fold_in(k_data, e), n, sgd.batch_size)
    )
    step_keys = jax.jit(jax.vmap(partial(jax.random.fold_in, k_drop)))
    collect = jax.jit(lambda m, p: swag_collect(m, ravel_pytree(p)[0]))

    def run(carry: SGDCarry, lo: int, hi: int) -> tuple[SGDCarry, dict[str, float]]:
        epoch, size = lo // per_epoch, hi - lo
        pad = np.minimum(np.arange(length), size - 1)  # padding repeats the last step
        first = lo - epoch * per_epoch
        idx = batches(epoch)[first : first + size][pad]
        keys = step_keys(jnp.asarray(lo + pad))  # step t's dropout key: fold_in(k_drop, t)
        ts, (loss, acc) = run_chunk(carry.ts, data.train, idx, keys, np.arange(length) < size)
        moments = collect(carry.moments, ts.params) if hi in collect_at else carry.moments
        return SGDCarry(ts, moments), {
            "swag/loss": float(loss[:size].mean()),
            "swag/acc": float(acc[:size].mean()),
            "swag/collected": float(moments.count),
        }

    divergence = Divergence(
        fix="Lower method.sgd.learning_rate, e.g. by 10x.",
        params=lambda carry: carry.ts,
        num_classes=model.spec.num_classes,
        loss=lambda carry, values: values["swag/loss"],
    )
    return chunked_loop(ctx, "swag", start, chunks, run, divergence, total, "swag sgd")


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


@dataclass(frozen=True)
class SWAG(Method):
    """SWA-Gaussian from a MAP start: constant-rate SGD, moments and rank-K deviations.

    Attributes:
      trainer: trains the MAP network (ignored with ``init_from``).
      init_from: a run folder whose ``checkpoint/map.msgpack`` holds the MAP network;
        None to train.
      sgd: the SGD phase (optimiser, constant rate, epochs, batch size).
      covariance: how members are drawn: ``LowRank`` (SWAG), ``Diagonal`` or ``SWA``.
      collect_every: SGD steps between collected iterates; None: 2K iterates evenly over
        the phase for ``LowRank`` (``steps // (2 rank)``), once per epoch for the others.
      bn_refresh_batches: training batches (of ``sgd.batch_size``) each member's
        BatchNorm statistics are recomputed on; a model without BatchNorm refuses
        another value than the default.
    """

    trainer: Trainer
    sgd: SGDPhase = field(default_factory=SGDPhase)
    init_from: str | None = None
    covariance: Covariance = field(default_factory=LowRank)
    collect_every: int | None = None
    bn_refresh_batches: int = BN_REFRESH_BATCHES

    def __post_init__(self):
        if not isinstance(self.covariance, Covariance):
            raise UserError(
                f"method.covariance must be a choice of method/swag/covariance "
                f"(conf/method/swag/covariance/); got {self.covariance!r}."
            )
        if self.bn_refresh_batches < 1 or (
            self.collect_every is not None and self.collect_every < 1
        ):
            raise UserError("method.bn_refresh_batches and method.collect_every must be >= 1.")
        if self.init_from is not None:
            checkpoint_path(self.init_from)  # fails now, before data or training

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

    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> SWAGPosterior:
        ctx = ctx or RunContext()
        n = data.train.size
        self.check(model, data)
        params, state = map_point(key, model, data, self.trainer, self.init_from, ctx)
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
        ctx.count(samples=self.covariance.size)
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

    def members(
        self, key: jax.Array, posterior: SWAGPosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        thetas = self.sample_thetas(key, posterior)  # (S, P)
        for start in range(0, thetas.shape[0], _CHUNK):
            yield _member_probs(posterior, thetas[start : start + _CHUNK], x)

    def plan(self, model: Model, data: Dataset) -> Work:
        """Steps and gradient evaluations of the MAP network (0 with ``init_from``) and
        the SGD phase, members, batch, networks. For ``dry_run``: counts the work of
        ``fit`` without doing it and raises what ``fit`` would refuse."""
        n = data.train.size
        steps = (0 if self.init_from else self.trainer.num_steps(n)) + self.sgd.num_steps(n)
        return Work(
            steps=steps,
            grad_evals=steps,
            members=self.covariance.size,
            batch_size=self.sgd.batch_size,
            networks=1,
        )

    def save(self, out_dir: Path, posterior: SWAGPosterior) -> Path:
        """Writes the MAP network, so a later run can reuse it with ``init_from``."""
        return save_point(out_dir, posterior.params, posterior.state)

    def report(
        self, key: jax.Array, posterior: SWAGPosterior, sets: dict[str, Split], num_bins: int
    ) -> dict[str, float]:
        """The MAP network the SGD phase started from: ``map/<set>/{acc,nll,ece,brier}``."""
        del key
        return map_metrics(posterior.model, posterior.params, posterior.state, sets, num_bins)


@jax.jit
def _member_probs(post: SWAGPosterior, thetas: jax.Array, x: jax.Array) -> jax.Array:
    """(s, N, C) log-probabilities: the network of each θ of ``thetas`` (s, P) on x, one at
    a time."""

    def one(theta):
        params, state = post.network(theta)
        return post.model.log_probs(params, state, x)

    return jax.lax.map(one, thetas)
