"""The one chunked loop of the trainer and the samplers.

Each chunk is one compiled ``lax.scan``; between chunks the host does the same five
things for every loop, in order: check the chunk's numbers are finite, log them,
advance the progress bar, and checkpoint. The loop restores before the first chunk
and counts the gradient evaluations after the last::

    restore -> [scan chunk -> finite check -> log -> checkpoint] * chunks -> count
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm

from bnn_bench.errors import UserError
from bnn_bench.methods.base import RunContext

log = logging.getLogger(__name__)

Carry = TypeVar("Carry")
RunChunk = Callable[[Any, int, int], tuple[Any, dict[str, float]]]  # (carry, start, end)
NOTE_EVERY_S = 30.0  # without a progress bar, a log line at most this often


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
    diverged: Callable[[Carry, dict[str, float], int], str | None],
    grad_evals: float,
    desc: str | None = None,
) -> Carry:
    """Runs ``run_chunk`` over ``chunks`` with resume, finite check, logging and checkpoints.

    Args:
      ctx: the run context: the checkpoint slot ``name``, the logger, the cost counter.
      name: the loop's name (its checkpoint folder).
      carry: the loop's state at step ``chunks[0][0]``; any pytree.
      chunks: consecutive ``(start, end)`` step ranges, each one call of ``run_chunk``.
      run_chunk: ``(carry, start, end) -> (carry, values)``: runs the steps
        ``[start, end)``; ``values`` (floats) go to the logger at step ``end``.
      diverged: ``(carry, values, end) -> message or None``: the ``UserError`` message
        when the chunk went non-finite (what happened and which key to change).
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
        message = diverged(carry, values, end)
        if message is not None:
            bar.close()
            raise UserError(message)
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


def nonfinite(values: dict[str, float], key: str) -> bool:
    """Whether ``values[key]`` is NaN or infinite."""
    return not math.isfinite(values[key])


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in values.items())
