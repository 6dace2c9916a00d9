"""A test-only logger that sends its own process SIGTERM once training reaches a step:
preemption at a known point, through the real signal path."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from bnn_bench.reporting.loggers import NoLogger, RunInfo, WandbLogger


class SigtermAt(NoLogger):
    """SIGTERM at ``step``; only in the run with ``seed`` (None: any), and only while the
    file ``once`` (None: always) does not exist yet (it is created on sending)."""

    def __init__(self, step: int, seed: int | None = None, once: str | None = None):
        self.step, self.seed, self.once = step, seed, once
        self.armed = False

    def start(
        self, out_dir: Path, config: dict, info: RunInfo, run_id: str | None = None
    ) -> str | None:
        self.armed = (self.seed is None or config["seed"] == self.seed) and (
            self.once is None or not Path(self.once).exists()
        )
        return None

    def log(self, values: dict[str, float], step: int) -> None:
        if self.armed and step >= self.step:
            self.armed = False
            if self.once is not None:
                Path(self.once).touch()
            os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class WandbSigtermAt(WandbLogger):
    """The W&B logger, plus SIGTERM once training reaches ``sigterm_step``."""

    sigterm_step: int = 0

    def log(self, values: dict[str, float], step: int) -> None:
        super().log(values, step)
        if step >= self.sigterm_step and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), signal.SIGTERM)
