"""What a config value may be, beyond its type: range markers for annotations, and the
schema of the root config (``conf/config.yaml``'s own keys).

A target states a range in its annotation, ``batch_size: Annotated[int, Positive]``;
``config.validate`` checks it with the type, before any work, in one message format:
``trainer.batch_size must be > 0, got 0.``
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal


@dataclass(frozen=True)
class Interval:
    """The values from ``lo`` to ``hi`` (None: unbounded); ``lo_open``/``hi_open``
    leave the end out."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, value: Any) -> bool:
        """Whether the number ``value`` lies in the interval (NaN never does)."""
        if isinstance(value, float) and math.isnan(value):
            return False
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"


Positive = Interval(0, None, lo_open=True)
NonNegative = Interval(0, None)
Probability = Interval(0, 1)


def out_of_range(value: Any, marks: tuple, path: str) -> str | None:
    """None if the number ``value`` is inside every ``Interval`` in ``marks`` (an
    ``Annotated`` type's extras); else the message naming ``path``."""
    for mark in marks:
        if isinstance(mark, Interval) and isinstance(value, int | float) and not mark.holds(value):
            return f"{path} must be {mark}, got {value!r}"
    return None


# --- the root config ---------------------------------------------------------------------------


@dataclass
class Checkpointing:
    """``checkpoint``: chunks between checkpoints of a loop (0: only on SIGTERM)."""

    every: Annotated[int, NonNegative] = 10


@dataclass
class Device:
    """``device``: per-job GPU memory, set before JAX starts (None: JAX's default)."""

    preallocate: bool | None = None
    mem_fraction: Annotated[float, Interval(0, 1, lo_open=True)] | None = None


@dataclass
class Objective:
    """``objective``: the key of metrics.json a Hydra sweeper optimises, and how."""

    metric: str = "val/nll"
    direction: Literal["minimize", "maximize"] = "minimize"


@dataclass
class Root:
    """``conf/config.yaml``: the groups (each checked against its own ``_target_``) and
    the run's own settings. A top-level node beyond these (``trainer``) must be passed
    on by an interpolation (``method.trainer: ${trainer}``), else nothing reads it."""

    dataset: Any = None
    model: Any = None
    likelihood: Any = None
    method: Any = None
    eval: Any = None
    logger: Any = None
    seed: int = 0
    resume: bool | Literal["auto"] = "auto"
    dry_run: bool = False
    checkpoint: Checkpointing = field(default_factory=Checkpointing)
    device: Device = field(default_factory=Device)
    objective: Objective = field(default_factory=Objective)
