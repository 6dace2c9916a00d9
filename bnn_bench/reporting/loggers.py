"""Experiment trackers behind one small interface (the ``logger`` config group)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Logger(Protocol):
    """What ``run.py`` hands training curves, final metrics and plots to."""

    def start(self, out_dir: Path, config: dict) -> None: ...
    def log(self, values: dict[str, float], step: int) -> None: ...
    def summary(self, metrics: dict[str, float]) -> None: ...
    def image(self, name: str, path: Path) -> None: ...
    def finish(self) -> None: ...


class NoLogger:
    """``logger=none``: the run folder alone keeps the results."""

    def start(self, out_dir: Path, config: dict) -> None:
        del out_dir, config

    def log(self, values: dict[str, float], step: int) -> None:
        del values, step

    def summary(self, metrics: dict[str, float]) -> None:
        del metrics

    def image(self, name: str, path: Path) -> None:
        del name, path

    def finish(self) -> None:
        pass
