"""The one chunked loop of the trainer and the samplers.

Each chunk is one compiled ``lax.scan``; between chunks the host does the same
things for every loop, in order: check that the chunk did not diverge (``Divergence``:
non-finite parameters, or a training loss blown up), log its numbers, advance the
progress bar, and checkpoint. The loop restores before the first chunk and counts the
gradient evaluations after the last::

    restore -> [scan chunk -> divergence check -> log -> checkpoint] * chunks -> count
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from bnn_bench.errors import UserError
from bnn_bench.methods.base import RunContext

log = logging.getLogger(__name__)

Carry = TypeVar("Carry")
RunChunk = Callable[[Any, int, int], tuple[Any, dict[str, float]]]  # (carry, start, end)
NOTE_EVERY_S = 30.0  # without a progress bar, a log line at most this often

# A chunk whose training NLL exceeds LOSS_BOUND x log C nats per example has diverged: an
# initialised network guesses about uniformly (NLL ~ log C), and a healthy run goes down
# from there. Chosen with scripts/divergence_margin.py (largest chunk NLL, loaded 2-core CPU):
# every training method's defaults on dataset=synthetic reach at most 1.0 x log C; the
# presets on Fashion-MNIST (their first 300 steps, chunks of 20) 1.14 x log C for the
# trainers (capsa_mnist_vote), but 4.7 x log C for blackjax_mnist_sgld, whose chain wanders
# at the tutorial's MNIST step size (its NLL of a fixed batch spikes; it finishes at the
# tutorial code's own accuracy). Diverged runs are far above: method=map
# trainer.schedule.init_value=1e3 reaches 2.4e9 nats, sgld at step 1e-2 on tests' TINY 1.4e20
# with finite parameters. 20 (46 nats for C = 10, 14 for C = 2) leaves a factor 4 over the
# wandering chain.
LOSS_BOUND = 20.0


@dataclass(frozen=True)
class Divergence:
    """What the chunked loop checks after every chunk, and what the user should change.

    A chunk has diverged when its parameters are not all finite, or when its mean
    training NLL per example is not finite or exceeds ``LOSS_BOUND`` x log C (x an
    uninformed guess's NLL, ``guess``, where given: regression).

    Attributes:
      fix: the advice, naming the key to change (``"Lower trainer.schedule.init_value
        (now 1000)."``), or ``values -> advice`` to quote the chunk's values.
      params: ``carry -> pytree`` of the parameters that must stay finite.
      num_classes: C, the scale of the loss bound.
      guess: the NLL per example of an uninformed guess (``Likelihood.guess_nll``), the
        scale of the loss bound in place of log C; None: log C.
      loss: ``(carry, values) -> float``: the chunk's mean training NLL per example (of its
        worst member or chain), the data term only (no prior, no KL); None: a loop that
        has none (HMC: its Metropolis test rejects a blow-up) checks the parameters only.
    """

    fix: str | Callable[[dict[str, float]], str]
    params: Callable[[Any], Any]
    num_classes: int = 2
    loss: Callable[[Any, dict[str, float]], float] | None = None
    guess: float | None = None

    @property
    def bound(self) -> float:
        """The largest healthy chunk NLL, nats per example."""
        return LOSS_BOUND * self.scale

    @property
    def scale(self) -> float:
        """An uninformed guess's NLL: log C, or ``guess``."""
        return math.log(max(self.num_classes, 2)) if self.guess is None else self.guess

    def check(self, carry: Any, values: dict[str, float]) -> str | None:
        """What went wrong in the chunk that left ``carry`` and ``values``, or None."""
        if not bool(_all_finite(self.params(carry))):
            return "the parameters became non-finite"
        if self.loss is None:
            return None
        loss = float(self.loss(carry, values))
        if not math.isfinite(loss):
            return f"the training loss became {loss}"
        if loss > self.bound and self.guess is not None:
            return (
                f"the training loss rose to {loss:.4g} nats per example, above "
                f"{LOSS_BOUND:g} x {self.guess:.3g} = {self.bound:.3g} (an uninformed guess scores "
                f"{self.guess:.3g})"
            )
        if loss > self.bound:
            c = max(self.num_classes, 2)
            return (
                f"the training loss rose to {loss:.4g} nats per example, above "
                f"{LOSS_BOUND:g} x log {c} = {self.bound:.3g} (a uniform guess scores log {c})"
            )
        return None


def chunks_of(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` in consecutive ``(lo, hi)`` chunks of ``size`` steps; the last may
    be shorter."""
    return [(lo, min(lo + size, end)) for lo in range(start, end, size)]


def chunked_loop(
    ctx: RunContext,
    name: str,
    carry: Carry,
    chunks: Sequence[tuple[int, int]],
    run_chunk: RunChunk,
    divergence: Divergence,
    grad_evals: float,
    desc: str | None = None,
) -> Carry:
    """Runs ``run_chunk`` over ``chunks`` with resume, divergence check, logging and
    checkpoints.

    Args:
      ctx: the run context: the checkpoint slot ``name``, the logger, the cost counter.
      name: the loop's name (its checkpoint folder).
      carry: the loop's state at step ``chunks[0][0]``; any pytree.
      chunks: consecutive ``(start, end)`` step ranges, each one call of ``run_chunk``.
      run_chunk: ``(carry, start, end) -> (carry, values)``: runs the steps
        ``[start, end)``; ``values`` (floats) go to the logger at step ``end``.
      divergence: what is checked after every chunk; a diverged chunk raises a
        ``UserError`` that says what happened and its ``fix``.
      grad_evals: the gradient evaluations of the whole loop, counted once at its end
        (also when resumed: counts describe the algorithm's work).
      desc: the progress bar's label (default ``name``).

    Returns:
      The carry after the last chunk.
    """
    total, desc = chunks[-1][1], desc or name
    ckpt = ctx.checkpoint(name)
    done, carry = ckpt.restore(carry) or (chunks[0][0], carry)
    bar = tqdm(
        total=total,
        initial=done,
        desc=desc,
        unit="step",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    last_note = time.perf_counter()
    for start, end in chunks:
        if end <= done:  # resumed: this chunk ran before the checkpoint
            continue
        carry, values = run_chunk(carry, start, end)
        what = divergence.check(carry, values)
        if what is not None:  # once per chunk, not per step: a blown-up run stays blown up
            bar.close()
            fix = divergence.fix(values) if callable(divergence.fix) else divergence.fix
            raise UserError(
                f"{desc} diverged between steps {start} and {end} of {total}: {what}. {fix}"
            )
        bar.update(end - start)
        bar.set_postfix({k.rsplit("/", 1)[-1]: f"{v:.4g}" for k, v in values.items()}, False)
        if bar.disable and time.perf_counter() - last_note > NOTE_EVERY_S:
            last_note = time.perf_counter()
            log.info("%s: step %d of %d %s", desc, end, total, _fmt(values))
        ctx.log(values, end)
        ckpt.maybe_save(end, carry)
    bar.close()
    ckpt.maybe_save(total, carry, final=True)
    ctx.count(grad_evals=grad_evals)
    return carry


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """() bool: every inexact leaf of ``tree`` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in values.items())
