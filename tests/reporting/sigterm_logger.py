"""A test-only logger that sends its own process SIGTERM once training reaches a step:
preemption at a known point, through the real signal path."""

from __future__ import annotations

import os
import signal

from bnn_bench.reporting.loggers import NoLogger


class SigtermAt(NoLogger):
    def __init__(self, step: int):
        self.step = step
        self.sent = False

    def log(self, values: dict[str, float], step: int) -> None:
        if step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
