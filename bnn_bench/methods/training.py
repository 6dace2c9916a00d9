"""Point-estimate training with optax: the ``trainer`` config group.

The loop runs ``jax.lax.scan`` over chunks of steps on device-resident data:
each epoch draws one permutation on the device, and each step gathers its
minibatch from it, so the host only advances the progress bar and the logger
between chunks. Methods that start from a MAP fit (Laplace, MC-BatchNorm) and
methods that train several networks (vote, ensembles) build on ``Trainer``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnn_bench.data import Dataset, Split
from bnn_bench.data.augment import training_batch
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.methods.base import RunContext
from bnn_bench.methods.loop import Divergence, chunked_loop, chunks_of
from bnn_bench.models import Model, Params, State
from bnn_bench.schema import NonNegative, Positive

log = logging.getLogger(__name__)


class TrainState(NamedTuple):
    """Parameters, model state (batch-norm statistics) and optimiser state."""

    params: Params
    state: State
    opt_state: Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of logits (B, C) against integer labels (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def epoch_batches(key: jax.Array, n: int, batch_size: int) -> jax.Array:
    """(n // batch_size, batch_size) indices of one shuffled epoch; the rest is dropped."""
    steps = n // batch_size
    return jax.random.permutation(key, n)[: steps * batch_size].reshape(steps, batch_size)


@dataclass(frozen=True)
class Trainer:
    """Optimiser, learning-rate schedule and budget for training a point estimate.

    Attributes:
      optimizer: an optax optimiser waiting for its learning rate (``optax.adam`` with
        ``_partial_: true``); the trainer passes ``learning_rate=<the schedule>``.
      schedule: the learning rate per step: an optax schedule, a ``functools.partial``
        of one that takes ``decay_steps`` (the trainer supplies the run's number of
        steps), or a number (a constant rate).
      l2: coupled weight decay: l2 · θ is added to the gradient before the optimiser
        (PyTorch's ``weight_decay`` for SGD and Adam). ``optax.adamw``'s own
        ``weight_decay`` is the decoupled kind.
      epochs: passes over the training split (ignored when ``steps`` is set).
      steps: total optimiser steps, or None to use ``epochs``.
      batch_size: minibatch size.
      eval_every: validate every this many epochs (0: never).
      chunk_size: steps per compiled ``lax.scan`` call (the progress-bar granularity).
    """

    optimizer: Callable[..., optax.GradientTransformation] = partial(optax.adam)
    schedule: optax.Schedule | Callable[..., optax.Schedule] | Annotated[float, Positive] = partial(
        optax.cosine_decay_schedule, init_value=3e-3
    )
    l2: Annotated[float, NonNegative] = 0.0
    epochs: Annotated[int, Positive] = 20
    steps: Annotated[int, Positive] | None = None
    batch_size: Annotated[int, Positive] = 128
    eval_every: Annotated[int, NonNegative] = 1
    chunk_size: Annotated[int, Positive] = 200

    def __post_init__(self):
        if not callable(self.optimizer):
            raise UserError(
                f"trainer.optimizer must be an optax optimiser node (e.g. "
                f"trainer/optimizer=adam); got {self.optimizer!r}."
            )
        if isinstance(self.schedule, bool) or not (
            callable(self.schedule) or isinstance(self.schedule, int | float)
        ):
            raise UserError(
                f"trainer.schedule must be an optax schedule node (e.g. "
                f"trainer/schedule=cosine) or a number (a constant rate); got {self.schedule!r}."
            )

    def steps_per_epoch(self, n: int) -> int:
        if self.batch_size > n:
            raise UserError(
                f"trainer.batch_size={self.batch_size} is larger than the training "
                f"split ({n} examples); lower it."
            )
        return n // self.batch_size

    def num_steps(self, n: int) -> int:
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch(n)

    def learning_rate_fn(self, num_steps: int) -> optax.ScalarOrSchedule:
        """The learning rate of a run of ``num_steps`` steps: a schedule or a number."""
        if not isinstance(self.schedule, partial):
            return self.schedule
        try:
            return self.schedule(decay_steps=max(num_steps, 1))
        except TypeError as e:
            name = getattr(self.schedule.func, "__name__", self.schedule.func)
            raise UserError(
                f"trainer.schedule: a _partial_ schedule is completed with the run's "
                f"decay_steps, which {name} does not take ({e}); drop _partial_ from it."
            ) from e

    def make_optimizer(self, num_steps: int) -> optax.GradientTransformation:
        """``optimizer(learning_rate=schedule)``, after the coupled ``l2`` decay if any."""
        tx = self.optimizer(learning_rate=self.learning_rate_fn(num_steps))
        if self.l2:
            return optax.chain(optax.add_decayed_weights(self.l2), tx)
        return tx

    def train(
        self,
        key: jax.Array,
        model: Model,
        data: Dataset,
        ctx: RunContext | None = None,
        init: tuple[Params, State] | None = None,
        name: str = "trainer",
    ) -> TrainState:
        """Trains ``model`` on ``data.train``; validates on ``data.val`` every ``eval_every``
        epochs. Returns the final ``TrainState``.

        Checkpoints as the loop ``name`` of the run context and continues from there when
        the run resumes; data order and dropout keys derive from the step, so a resumed
        run trains exactly as an uninterrupted one."""
        k_init, k_data, k_drop = jax.random.split(key, 3)
        params, state = init if init is not None else model.init(k_init)
        n = data.train.size
        tx = self.make_optimizer(self.num_steps(n))
        evaluate = jax.jit(lambda ts, x, y: _loss_acc(model.logits(ts.params, ts.state, x), y))
        return self.run_loop(
            ctx or RunContext(),
            name,
            TrainState(params, state, tx.init(params)),
            data,
            make_chunk_runner(model, tx),
            epoch_idx=lambda e: epoch_batches(jax.random.fold_in(k_data, e), n, self.batch_size),
            chunk_keys=lambda s, z: jax.random.split(jax.random.fold_in(k_drop, s), z),
            evaluate=evaluate,
        )

    def train_members(
        self,
        keys: jax.Array,
        model: Model,
        data: Dataset,
        ctx: RunContext | None = None,
        shared_batches: jax.Array | None = None,
        name: str = "trainer",
    ) -> TrainState:
        """Trains K networks together, vmapped in one compiled loop.

        Member k derives its keys from ``keys[k]`` exactly as ``train(keys[k], ...)``
        does (``k_init, k_data, k_drop = split(keys[k], 3)``), so with
        ``shared_batches=None`` member k ends where ``train(keys[k], ...)`` ends, up to
        float rounding (a deep-ensemble member is a MAP run).

        With ``shared_batches`` (a key), every epoch draws ONE permutation from
        ``fold_in(shared_batches, epoch)`` and splits each minibatch of ``batch_size``
        into K consecutive slices of ``batch_size // K``: member k trains on slice k
        (capsa's vote; the method checks that ``batch_size`` is a multiple of K).

        Args:
          keys: (K,) keys, one per member.
          model: the network (the same architecture for every member).
          data: ``data.train`` is trained on; ``data.val``, if any, is validated on
            with the members' mean probabilities every ``eval_every`` epochs.
          ctx: the run context (logger of member-averaged curves, checkpoints, cost).
          shared_batches: a key for split batches (vote), or None for each member's
            own full batches (deep ensembles).
          name: the loop's name (its checkpoint slot).

        Returns:
          The final ``TrainState``; every leaf has a leading member axis K.
        """
        k_members = keys.shape[0]
        sub = jax.vmap(lambda k: jax.random.split(k, 3))(keys)  # (K, 3)
        k_init, k_data, k_drop = sub[:, 0], sub[:, 1], sub[:, 2]
        n = data.train.size
        per_epoch = self.steps_per_epoch(n)
        params, state = jax.vmap(model.init)(k_init)
        tx = self.make_optimizer(self.num_steps(n))

        def epoch_idx(epoch: int) -> jax.Array:  # (per_epoch, K, b)
            if shared_batches is None:
                return jax.vmap(
                    lambda k: epoch_batches(jax.random.fold_in(k, epoch), n, self.batch_size),
                    out_axes=1,
                )(k_data)
            b = epoch_batches(jax.random.fold_in(shared_batches, epoch), n, self.batch_size)
            return b.reshape(per_epoch, k_members, -1)

        @jax.jit
        def evaluate(ts, x, y):  # the members' mean prediction
            probs = jax.vmap(model.probs, in_axes=(0, 0, None))(ts.params, ts.state, x).mean(0)
            return M.nll(probs, y, xp=jnp), jnp.mean(probs.argmax(-1) == y)

        return self.run_loop(
            ctx or RunContext(),
            name,
            TrainState(params, state, jax.vmap(tx.init)(params)),
            data,
            make_chunk_runner(model, tx, members=True),
            epoch_idx=epoch_idx,
            chunk_keys=lambda s, z: jax.vmap(
                lambda k: jax.random.split(jax.random.fold_in(k, s), z), out_axes=1
            )(k_drop),
            evaluate=evaluate,
            members=k_members,
        )

    def run_loop(
        self,
        ctx: RunContext,
        name: str,
        ts: Any,
        data: Dataset,
        run_chunk,
        epoch_idx,
        chunk_keys,
        evaluate,
        members: int = 1,
        grad_evals_per_step: int = 1,
        desc: str | None = None,
    ) -> Any:
        """The chunked loop of ``train`` and ``train_members`` (and of ``vi``, whose state
        is its own): epochs of ``batch_size`` minibatches, validation, logging.

        Args:
          ts: the initial state, any pytree (leaves with a leading member axis for
            several members): a ``TrainState`` for ``train``.
          run_chunk: ``make_chunk_runner``'s ``(ts, split, idx, keys, active) -> (ts,
            (loss, acc))``, one compiled scan; or ``(ts, (loss, acc, nll))`` when the loss
            is more than the training NLL (vi: it adds the KL term), so that the divergence
            check sees the NLL alone (logged as ``train/nll``).
          epoch_idx: epoch -> (steps_per_epoch, ...) minibatch indices of that epoch.
          chunk_keys: (step, size) -> the dropout keys of steps [step, step + size).
          evaluate: ``(ts, x, y) -> (nll, acc)`` on the validation split.
          members: networks trained at once (the cost counts each).
          grad_evals_per_step: gradient evaluations of one step of one network (vi: its
            Monte Carlo samples of the ELBO).
          desc: the progress bar's label (default ``train`` or ``train xK``).

        Chunks never straddle an epoch; every chunk is padded with inactive steps to one
        length, so the step compiles once per run.
        """
        n = data.train.size
        per_epoch, total = self.steps_per_epoch(n), self.num_steps(n)
        length = min(self.chunk_size, per_epoch, total)
        chunks = [
            c
            for lo in range(0, total, per_epoch)
            for c in chunks_of(lo, min(lo + per_epoch, total), length)
        ]
        batches = functools.lru_cache(maxsize=1)(epoch_idx)  # one permutation per epoch
        t0 = time.perf_counter()
        worst_nll = [0.0]  # the last chunk's mean training NLL of its worst member

        def run(ts: Any, start: int, end: int) -> tuple[Any, dict[str, float]]:
            epoch, size = start // per_epoch, end - start
            pad = np.minimum(np.arange(length), size - 1)  # padding repeats the last step
            lo = start - epoch * per_epoch
            idx, keys = batches(epoch)[lo : lo + size][pad], chunk_keys(start, size)[pad]
            ts, (loss, acc, *nll) = run_chunk(ts, data.train, idx, keys, np.arange(length) < size)
            values = {
                "train/loss": float(loss[:size].mean()),
                "train/acc": float(acc[:size].mean()),
            }
            fit = np.asarray((nll[0] if nll else loss)[:size]).mean(0)  # () or (members,)
            worst_nll[0] = float(fit.max())
            if nll:
                values["train/nll"] = float(fit.mean())
            if end % per_epoch == 0 or end == total:
                values |= self._end_epoch(ts, epoch + 1, end, end == total, values, data, evaluate)
            return ts, values

        divergence = Divergence(
            fix=self.lower_the_rate(total),
            params=lambda ts: ts,  # every float leaf of the state: parameters and moments
            num_classes=data.spec.num_classes,
            loss=lambda ts, values: worst_nll[0],
        )
        desc = desc or ("train" if members == 1 else f"train x{members}")
        grads = total * members * grad_evals_per_step
        ts = chunked_loop(ctx, name, ts, chunks, run, divergence, grads, desc)
        log.info("trained %d x %d steps in %.1fs", members, total, time.perf_counter() - t0)
        return ts

    def lower_the_rate(self, num_steps: int) -> str:
        """The advice of a diverged run: the learning-rate key of this schedule, and its
        value at step 0."""
        rate = self.learning_rate_fn(num_steps)
        now = f"{float(rate(0) if callable(rate) else rate):.3g}"
        # an instantiated optax schedule is a closure: its factory's name tells which it is
        made_by = getattr(self.schedule, "__qualname__", "").split(".")[0]
        if made_by == "constant_schedule":
            return f"Lower the learning rate trainer.schedule.value (now {now}), e.g. by 10x."
        if made_by == "piecewise_constant_schedule" or (
            isinstance(self.schedule, partial) and "init_value" in self.schedule.keywords
        ):
            return f"Lower the learning rate trainer.schedule.init_value (now {now}), e.g. by 10x."
        if isinstance(self.schedule, int | float):
            return f"Lower the constant learning rate trainer.schedule (now {now}), e.g. by 10x."
        return (
            f"Lower the learning rate (now {now} at step 0), e.g. by 10x: "
            f"trainer.schedule.value (trainer/schedule=constant), "
            f"trainer.schedule.init_value (cosine, piecewise), or a constant "
            f"trainer.schedule=1e-4."
        )

    def _end_epoch(
        self, ts, epoch: int, step: int, last: bool, train: dict[str, float], data, evaluate
    ) -> dict[str, float]:
        """Validates at the end of every ``eval_every``-th epoch and of the run; logs the
        epoch's line. Returns the validation values for the logger ({} without)."""
        loss, acc = train["train/loss"], train["train/acc"]
        if data.val is None or not self.eval_every or (epoch % self.eval_every and not last):
            log.info("epoch %d step %d: train loss %.4f acc %.4f", epoch, step, loss, acc)
            return {}
        vl, va = (float(v) for v in evaluate(ts, data.val.x, data.val.y))
        log.info(
            "epoch %d step %d: train loss %.4f acc %.4f | val nll %.4f acc %.4f",
            *(epoch, step, loss, acc, vl, va),
        )
        return {"val/nll": vl, "val/acc": va, "epoch": epoch}


def _loss_acc(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)


def _make_step(model: Model, tx: optax.GradientTransformation):
    """One optimiser step ``(ts, x (B, ...), y (B,), key) -> (ts, (loss, acc))`` of one model."""

    def loss_fn(params, state, x, y, key):
        logits, new_state = model.apply(params, state, x, train=True, key=key)
        return cross_entropy(logits, y), (new_state, jnp.mean(jnp.argmax(logits, -1) == y))

    def step(ts: TrainState, x, y, key):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (state, acc)), grads = grad_fn(ts.params, ts.state, x, y, key)
        updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        return TrainState(params, state, opt_state), (loss, acc)

    return step


def make_chunk_runner(model: Model, tx: optax.GradientTransformation, members: bool = False):
    """A jitted ``(ts, split, idx (n, B), keys (n,), active (n,) = None) -> (ts, (loss (n,),
    acc (n,)))`` that scans n optimiser steps over the minibatches ``split[idx[i]]``.

    Steps with ``active[i]`` false leave ``ts`` as it is (they pad a short chunk to the
    loop's chunk length, so one compiled scan serves every chunk); None: all active.

    With ``members=True`` it trains K networks in the same scan, vmapped: every leaf of
    ``ts`` has a leading member axis K, ``idx`` is (n, K, b), ``keys`` (n, K), and at step
    i member k steps on ``split[idx[i, k]]`` with dropout key ``keys[i, k]``; the losses
    and accuracies are (n, K).
    """
    return scan_steps(_make_step(model, tx), members, augment=model.spec.augment)


def scan_steps(step_fn, members: bool = False, num_outputs: int = 2, augment: bool = False):
    """``make_chunk_runner`` for any step ``(ts, x (B, ...), y (B,), key) -> (ts, (loss,
    acc))`` or, with ``num_outputs=3``, ``(ts, (loss, acc, nll))`` over any state pytree
    ``ts`` (``vi`` steps its variational parameters); ``augment``: ``Spec.augment``."""

    def one(ts, split, idx, key):
        return step_fn(ts, *training_batch(split, idx, key, augment), key)

    live = jax.vmap(one, in_axes=(0, None, 0, 0)) if members else one

    def step(carry: tuple[Any, Split], inp):
        ts, split = carry
        idx, key, on = inp
        if on is None:
            ts, out = live(ts, split, idx, key)
        else:  # an inactive step returns zeros, each () or (K,)
            # from num_outputs, not jax.eval_shape of the step: that would trace the model
            # a second time per compile
            zero = jnp.zeros(jax.tree.leaves(ts)[0].shape[:1] if members else ())
            zeros = (zero,) * num_outputs
            ts, out = jax.lax.cond(
                on, lambda ts: live(ts, split, idx, key), lambda ts: (ts, zeros), ts
            )
        return (ts, split), out

    @jax.jit
    def run(ts: Any, split: Split, idx: jax.Array, keys: jax.Array, active=None):
        (ts, _), out = jax.lax.scan(step, (ts, split), (idx, keys, active))
        return ts, out

    return run
