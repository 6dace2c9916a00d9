"""Point-estimate training with optax: the ``trainer`` config group.

The loop runs ``jax.lax.scan`` over chunks of steps on device-resident data:
each epoch draws one permutation on the device, and each step gathers its
minibatch from it, so the host only advances the progress bar and the logger
between chunks. Methods that start from a MAP fit (Laplace, MC-BatchNorm) and
methods that train several networks (vote, ensembles) build on ``Trainer``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from bnn_bench import checkpoint
from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.models import Model, Params, State
from bnn_bench.reporting import cost

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "multistep")


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
    """Optimiser, schedule and budget for training a point estimate.

    Attributes:
      optimizer: ``adam``, ``adamw`` (decoupled weight decay) or ``sgd``.
      learning_rate: peak learning rate.
      momentum: SGD momentum (0 for plain SGD).
      nesterov: Nesterov momentum for SGD.
      b1, b2: Adam's moment decays.
      weight_decay: L2 coefficient, added to the gradient for adam/sgd (PyTorch's
        convention), decoupled for adamw.
      schedule: ``constant``, ``cosine`` (to zero over the run) or ``multistep``.
      milestones: epochs at which ``multistep`` multiplies the rate by ``gamma``.
      gamma: the ``multistep`` factor.
      epochs: passes over the training split (ignored when ``steps`` is set).
      steps: total optimiser steps, or None to use ``epochs``.
      batch_size: minibatch size.
      eval_every: validate every this many epochs (0: never).
      chunk_size: steps per compiled ``lax.scan`` call (the progress-bar granularity).
    """

    optimizer: str = "adam"
    learning_rate: float = 3e-3
    momentum: float = 0.9
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0
    schedule: str = "cosine"
    milestones: Sequence[float] = ()
    gamma: float = 0.1
    epochs: int = 20
    steps: int | None = None
    batch_size: int = 128
    eval_every: int = 1
    chunk_size: int = 200

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"trainer.optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}."
            )
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"trainer.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}."
            )
        if self.batch_size < 1 or self.chunk_size < 1 or self.learning_rate <= 0:
            raise UserError(
                "trainer.batch_size, trainer.chunk_size and trainer.learning_rate must be positive."
            )
        if self.steps is None and self.epochs < 1:
            raise UserError("trainer.epochs must be >= 1 (or set trainer.steps).")

    def steps_per_epoch(self, n: int) -> int:
        if self.batch_size > n:
            raise UserError(
                f"trainer.batch_size={self.batch_size} is larger than the training "
                f"split ({n} examples); lower it."
            )
        return n // self.batch_size

    def num_steps(self, n: int) -> int:
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch(n)

    def learning_rate_fn(self, num_steps: int, steps_per_epoch: int) -> optax.Schedule:
        if self.schedule == "cosine":
            return optax.cosine_decay_schedule(self.learning_rate, max(num_steps, 1))
        if self.schedule == "multistep":
            bounds = {int(round(m * steps_per_epoch)): self.gamma for m in self.milestones}
            return optax.piecewise_constant_schedule(self.learning_rate, bounds)
        return optax.constant_schedule(self.learning_rate)

    def make_optimizer(self, num_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
        lr = self.learning_rate_fn(num_steps, steps_per_epoch)
        if self.optimizer == "adamw":
            return optax.adamw(lr, self.b1, self.b2, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            base = optax.adam(lr, self.b1, self.b2)
        else:
            base = optax.sgd(lr, momentum=self.momentum or None, nesterov=self.nesterov)
        if self.weight_decay:
            return optax.chain(optax.add_decayed_weights(self.weight_decay), base)
        return base

    def train(
        self,
        key: jax.Array,
        model: Model,
        data: Dataset,
        log_fn: Callable[[dict[str, float], int], None] | None = None,
        init: tuple[Params, State] | None = None,
    ) -> TrainState:
        """Trains ``model`` on ``data.train``; validates on ``data.val`` every ``eval_every``
        epochs. Returns the final ``TrainState``.

        Checkpoints every ``checkpoint.every`` chunks in a run and continues from the
        last one when the run resumes; data order and dropout keys derive from the
        step, so a resumed run trains exactly as an uninterrupted one."""
        k_init, k_data, k_drop = jax.random.split(key, 3)
        params, state = init if init is not None else model.init(k_init)
        n = data.train.size
        tx = self.make_optimizer(self.num_steps(n), self.steps_per_epoch(n))
        evaluate = jax.jit(lambda ts, x, y: _loss_acc(model.logits(ts.params, ts.state, x), y))
        return self._loop(
            TrainState(params, state, tx.init(params)),
            data,
            make_chunk_runner(model, tx),
            epoch_idx=lambda e: epoch_batches(jax.random.fold_in(k_data, e), n, self.batch_size),
            chunk_keys=lambda s, z: jax.random.split(jax.random.fold_in(k_drop, s), z),
            evaluate=evaluate,
            log_fn=log_fn,
            desc="train",
        )

    def train_members(
        self,
        keys: jax.Array,
        model: Model,
        data: Dataset,
        log_fn: Callable[[dict[str, float], int], None] | None = None,
        shared_batches: jax.Array | None = None,
    ) -> TrainState:
        """Trains K networks together, vmapped in one compiled loop.

        Member k derives its keys from ``keys[k]`` exactly as ``train(keys[k], ...)``
        does (``k_init, k_data, k_drop = split(keys[k], 3)``), so with
        ``shared_batches=None`` member k ends where ``train(keys[k], ...)`` ends, up to
        float rounding (a deep-ensemble member is a MAP run).

        With ``shared_batches`` (a key), every epoch draws ONE permutation from
        ``fold_in(shared_batches, epoch)`` and splits each minibatch of ``batch_size``
        into K consecutive slices of ``batch_size // K``: member k trains on slice k
        (capsa's vote). ``batch_size`` must then be a multiple of K.

        Args:
          keys: (K,) keys, one per member.
          model: the network (the same architecture for every member).
          data: ``data.train`` is trained on; ``data.val``, if any, is validated on
            with the members' mean probabilities every ``eval_every`` epochs.
          log_fn: receives member-averaged training curves.
          shared_batches: a key for split batches (vote), or None for each member's
            own full batches (deep ensembles).

        Returns:
          The final ``TrainState``; every leaf has a leading member axis K.
        """
        k_members = keys.shape[0]
        sub = jax.vmap(lambda k: jax.random.split(k, 3))(keys)  # (K, 3)
        k_init, k_data, k_drop = sub[:, 0], sub[:, 1], sub[:, 2]
        n = data.train.size
        per_epoch = self.steps_per_epoch(n)
        total = self.num_steps(n)
        if shared_batches is not None and self.batch_size % k_members:
            raise UserError(
                f"trainer.batch_size={self.batch_size} is not a multiple of the "
                f"{k_members} voters; each batch is split among them. Use a "
                f"multiple, e.g. trainer.batch_size="
                f"{max(k_members, self.batch_size // k_members * k_members)}."
            )
        params, state = jax.vmap(model.init)(k_init)
        tx = self.make_optimizer(total, per_epoch)

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

        return self._loop(
            TrainState(params, state, jax.vmap(tx.init)(params)),
            data,
            make_chunk_runner(model, tx, members=True),
            epoch_idx=epoch_idx,
            chunk_keys=lambda s, z: jax.vmap(
                lambda k: jax.random.split(jax.random.fold_in(k, s), z), out_axes=1
            )(k_drop),
            evaluate=evaluate,
            log_fn=log_fn,
            desc=f"train x{k_members}",
            members=k_members,
        )

    def _loop(
        self,
        ts: TrainState,
        data: Dataset,
        run_chunk,
        epoch_idx,
        chunk_keys,
        evaluate,
        log_fn,
        desc: str,
        members: int = 1,
    ) -> TrainState:
        """The chunked loop of ``train`` and ``train_members``.

        Args:
          ts: the initial state (leaves with a leading member axis for several members).
          run_chunk: ``(ts, split, idx, keys) -> (ts, (loss, acc))``, one compiled scan.
          epoch_idx: epoch -> (steps_per_epoch, ...) minibatch indices of that epoch.
          chunk_keys: (step, size) -> the dropout keys of steps [step, step + size).
          evaluate: ``(ts, x, y) -> (nll, acc)`` on the validation split.

        Checkpoints every ``checkpoint.every`` chunks in a run and continues from the
        last one when the run resumes; data order and dropout keys derive from the
        step, so a resumed run trains exactly as an uninterrupted one.
        """
        n = data.train.size
        per_epoch, total = self.steps_per_epoch(n), self.num_steps(n)
        ckpt = checkpoint.loop("trainer")
        step, ts = ckpt.restore(ts) or (0, ts)
        t0, epoch = time.perf_counter(), step // per_epoch
        bar = tqdm(
            total=total,
            initial=step,
            desc=desc,
            unit="step",
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
            dynamic_ncols=True,
        )
        while step < total:
            batches = epoch_idx(epoch)
            start = step - epoch * per_epoch  # > 0 only when resuming mid-epoch
            while start < per_epoch and step < total:
                size = min(self.chunk_size, per_epoch - start, total - step)
                ts, (loss, acc) = run_chunk(
                    ts, data.train, batches[start : start + size], chunk_keys(step, size)
                )
                loss, acc = float(loss.mean()), float(acc.mean())
                if not math.isfinite(loss):
                    raise UserError(
                        f"training diverged at step {step + size} (loss {loss}); "
                        f"lower trainer.learning_rate."
                    )
                start, step = start + size, step + size
                bar.update(size)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", refresh=False)
                if log_fn:
                    log_fn({"train/loss": loss, "train/acc": acc}, step)
                ckpt.maybe_save(step, ts)
            epoch += 1
            last = step >= total
            if data.val is not None and self.eval_every and (epoch % self.eval_every == 0 or last):
                vl, va = (float(v) for v in evaluate(ts, data.val.x, data.val.y))
                log.info(
                    "epoch %d step %d: train loss %.4f acc %.4f | val nll %.4f acc %.4f",
                    epoch,
                    step,
                    loss,
                    acc,
                    vl,
                    va,
                )
                if log_fn:
                    log_fn({"val/nll": vl, "val/acc": va, "epoch": epoch}, step)
            else:
                log.info("epoch %d step %d: train loss %.4f acc %.4f", epoch, step, loss, acc)
        bar.close()
        ckpt.maybe_save(step, ts, final=True)
        cost.count(grad_evals=total * members)
        log.info("trained %d x %d steps in %.1fs", members, total, time.perf_counter() - t0)
        return ts


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
    """A jitted ``(ts, split, idx (n, B), keys (n,)) -> (ts, (loss (n,), acc (n,)))`` that
    scans n optimiser steps over the minibatches ``split[idx[i]]``.

    With ``members=True`` it trains K networks in the same scan, vmapped: every leaf of
    ``ts`` has a leading member axis K, ``idx`` is (n, K, b), ``keys`` (n, K), and at step
    i member k steps on ``split[idx[i, k]]`` with dropout key ``keys[i, k]``; the losses
    and accuracies are (n, K).
    """
    step_fn = _make_step(model, tx)

    def one(ts, split, idx, key):
        return step_fn(ts, split.x[idx], split.y[idx], key)

    many = jax.vmap(one, in_axes=(0, None, 0, 0))

    def step(carry: tuple[TrainState, Split], inp):
        ts, split = carry
        ts, out = (many if members else one)(ts, split, *inp)
        return (ts, split), out

    @jax.jit
    def run(ts: TrainState, split: Split, idx: jax.Array, keys: jax.Array):
        (ts, _), out = jax.lax.scan(step, (ts, split), (idx, keys))
        return ts, out

    return run
