"""A test-only logger that pauses its run at a known point until the test says go:
at a training step (inside a checkpointed loop) or at the final summary (outside any
loop), so a test can start a second process or send a signal at that point."""

from __future__ import annotations

import time
from pathlib import Path

from bnn_bench.reporting.loggers import NoLogger


class PauseAt(NoLogger):
    """Touches ``<until>.reached``, then waits (at most 300 s) until the file ``until``
    exists: at the first ``log`` at or after ``step``, or in ``summary`` when ``step``
    is None."""

    def __init__(self, until: str, step: int | None = None):
        self.until, self.step, self.done = Path(until), step, False

    def _pause(self) -> None:
        if self.done:
            return
        self.done = True
        Path(f"{self.until}.reached").touch()
        deadline = time.monotonic() + 300
        while not self.until.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def log(self, values: dict[str, float], step: int) -> None:
        if self.step is not None and step >= self.step:
            self._pause()

    def summary(self, metrics: dict[str, float]) -> None:
        if self.step is None:
            self._pause()
