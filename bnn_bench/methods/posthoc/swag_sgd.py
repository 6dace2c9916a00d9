"""SWAG's SGD phase: constant-rate SGD from the MAP network, collecting its iterates.

The phase is the run's chunked loop ``swag`` (``methods/loop.py``): it checkpoints the
optimiser state and the moments together (``SGDCarry``) and resumes where it stopped. A
chunk ends at every collection and every epoch's end. Keys: from the phase's key,
``k_data, k_drop = split(key)``, one permutation per epoch from ``fold_in(k_data, epoch)``
and the dropout key of step t ``fold_in(k_drop, t)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from bnn_bench.data import Dataset
from bnn_bench.errors import UserError
from bnn_bench.methods.base import RunContext
from bnn_bench.methods.loop import Divergence, chunked_loop, chunks_of
from bnn_bench.methods.posthoc.swag_covariance import SWAGState, swag_collect
from bnn_bench.methods.training import TrainState, epoch_batches, make_chunk_runner
from bnn_bench.models import Model


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
            f"swag/{model.likelihood.score_name}": float(acc[:size].mean()),
            "swag/collected": float(moments.count),
        }

    divergence = Divergence(
        fix="Lower method.sgd.learning_rate, e.g. by 10x.",
        params=lambda carry: carry.ts,
        num_classes=model.spec.num_classes,
        loss=lambda carry, values: values["swag/loss"],
        guess=model.likelihood.guess_nll(model.spec.num_classes),
    )
    return chunked_loop(ctx, "swag", start, chunks, run, divergence, total, "swag sgd")
