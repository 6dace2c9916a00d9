"""Experiment trackers behind one small interface (the ``logger`` config group).

Every run writes ``history.jsonl`` in its folder (``HistoryLogger``, always on);
``logger=`` adds a tracker: ``none`` (default) or ``wandb``. ``run.py`` talks to
them through ``Loggers``, which fans each call out.

History file format: one JSON object per line, ``{"step": int, "time": float,
<name>: number, ...}``; a resumed run appends, so a step can appear twice (read
the last one).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from bnn_bench.run_folder import HISTORY, HYDRA, NOT_IDENTITY, OVERRIDES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """Who a run is: its Hydra overrides and, in a multirun, its sweep folder.

    Attributes:
      overrides: the task overrides as typed (``["method=psgld", "seed=1"]``).
      sweep_dir: the multirun's sweep folder, or None for a single run.
    """

    overrides: tuple[str, ...] = ()
    sweep_dir: str | None = None

    @classmethod
    def current(cls, out_dir: Path) -> RunInfo:
        """From the running Hydra job, else from ``out_dir/.hydra/overrides.yaml``."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            sweep = str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
            return cls(tuple(hc.overrides.task), sweep)
        return cls(tuple(read_overrides(out_dir)))

    def identity(self) -> list[str]:
        """The overrides that say what the run computes, in the order typed."""
        return [o for o in self.overrides if override_key(o).split(".")[0] not in NOT_IDENTITY]

    def name(self) -> str | None:
        """A readable run name from the overrides, e.g. ``method=psgld,seed=1``."""
        return ",".join(o.lstrip("+~") for o in self.identity()) or None


def override_key(override: str) -> str:
    """``"+method.lr=0.1"`` -> ``"method.lr"``."""
    return override.split("=", 1)[0].lstrip("+~")


def read_overrides(run_dir: Path) -> list[str]:
    """The overrides Hydra saved in ``run_dir/.hydra/overrides.yaml`` ([] if none)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / HYDRA / OVERRIDES
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


class Logger(Protocol):
    """What ``run.py`` hands training curves, final metrics, plots and curves to."""

    def start(
        self, out_dir: Path, config: dict, info: RunInfo, run_id: str | None = None
    ) -> str | None:
        """Opens the run; ``run_id`` continues an earlier one (resume). Returns the
        tracker's run id to save with the checkpoint, or None."""
        ...

    def log(self, values: dict[str, float], step: int) -> None: ...
    def summary(self, metrics: dict[str, float]) -> None: ...
    def image(self, name: str, path: Path) -> None: ...

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A curve as a table (e.g. reliability bins)."""
        ...

    def finish(self, ok: bool = True) -> None: ...


class NoLogger:
    """``logger=none``: the run folder alone keeps the results."""

    def start(
        self, out_dir: Path, config: dict, info: RunInfo, run_id: str | None = None
    ) -> str | None:
        del out_dir, config, info, run_id
        return None

    def log(self, values: dict[str, float], step: int) -> None:
        del values, step

    def summary(self, metrics: dict[str, float]) -> None:
        del metrics

    def image(self, name: str, path: Path) -> None:
        del name, path

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        del name, columns, rows

    def finish(self, ok: bool = True) -> None:
        del ok


class HistoryLogger(NoLogger):
    """Appends every ``log`` call to ``<run>/history.jsonl`` (always on, offline)."""

    def __init__(self, filename: str = HISTORY):
        self.filename = filename
        self._file = None

    def start(
        self, out_dir: Path, config: dict, info: RunInfo, run_id: str | None = None
    ) -> str | None:
        del config, info, run_id
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(Path(out_dir) / self.filename, "a", buffering=1)  # noqa: SIM115
        return None

    def log(self, values: dict[str, float], step: int) -> None:
        if self._file is None:
            return
        row = {"step": int(step), "time": time.time()}
        row.update({k: _number(v) for k, v in values.items()})
        self._file.write(json.dumps(row) + "\n")

    def finish(self, ok: bool = True) -> None:
        del ok
        if self._file is not None:
            self._file.close()
            self._file = None


def _number(v: Any) -> float | int | None:
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, bool | int):
        return int(v)
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class WandbLogger:
    """``logger=wandb``: a Weights & Biases run per bnn-bench run.

    Training curves go to the history at the loop's step, final metrics to the
    summary, plots as images, curves as tables. The run's files live in
    ``<run>/wandb/``; an offline run can be uploaded later with ``wandb sync``.

    Attributes:
      project, entity: where the run goes (entity None: your default).
      group: W&B group; None groups a multirun's jobs by their sweep folder.
      tags: W&B tags.
      name: run name; None names it from the overrides (``method=psgld,seed=1``).
      notes: free text shown with the run.
      mode: ``online``, ``offline`` or ``disabled``. An online run whose server
        cannot be reached, or that has no API key (non-interactive), says so and
        goes offline.
      reach_timeout: seconds to wait for the server before going offline.
      init_timeout: seconds ``wandb.init`` may take.
    """

    project: str = "bnn-bench"
    entity: str | None = None
    group: str | None = None
    tags: Sequence[str] = ()
    name: str | None = None
    notes: str | None = None
    mode: str = "online"
    reach_timeout: float = 5.0
    init_timeout: float = 90.0
    run: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        from bnn_bench.errors import UserError

        if self.mode not in ("online", "offline", "disabled"):
            raise UserError(f"logger.mode must be online, offline or disabled; got {self.mode!r}.")

    def start(
        self, out_dir: Path, config: dict, info: RunInfo, run_id: str | None = None
    ) -> str | None:
        import wandb

        mode = self.mode
        if mode == "online":
            reason = _offline_reason(self.reach_timeout)
            if reason:
                log.warning(
                    "wandb: %s; logging offline to %s/wandb (upload later with `wandb sync`).",
                    reason,
                    out_dir,
                )
                mode = "offline"
        kwargs = dict(
            project=self.project,
            entity=self.entity,
            group=self.group or info.sweep_dir,
            tags=list(self.tags),
            name=self.name or info.name(),
            notes=self.notes,
            config={**config, "overrides": list(info.overrides)},
            dir=str(out_dir),
            id=run_id,
            resume="allow",
            settings=wandb.Settings(init_timeout=self.init_timeout),
        )
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure to reach the server means the same
            if mode != "online":
                raise
            log.warning("wandb: online start failed (%s); logging offline instead.", e)
            self.run = wandb.init(mode="offline", **kwargs)
        log.info("wandb: run %s (%s)", self.run.id, "offline" if self.run.offline else mode)
        return self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({k: _number(v) for k, v in values.items()}, step=int(step))

    def summary(self, metrics: dict[str, float]) -> None:
        self.run.summary.update({k: _number(v) for k, v in metrics.items()})

    def image(self, name: str, path: Path) -> None:
        import wandb

        self.run.log({f"plots/{name}": wandb.Image(str(path))})

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def finish(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None


def _offline_reason(timeout: float) -> str | None:
    """Why an online W&B run cannot start here (its server is unreachable), or None.
    A missing API key shows up as wandb.init's own error, caught by the caller."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        return f"cannot reach {url.hostname}:{port} ({e.strerror or e})"
    return None


class Loggers:
    """Fans every call out to several loggers (the history file plus the tracker)."""

    def __init__(self, *loggers: Logger):
        self.loggers = loggers

    def start(
        self, out_dir: Path, config: dict, info: RunInfo, run_id: str | None = None
    ) -> str | None:
        ids = [lg.start(out_dir, config, info, run_id) for lg in self.loggers]
        return next((i for i in ids if i), None)

    def log(self, values: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(values, step)

    def summary(self, metrics: dict[str, float]) -> None:
        for lg in self.loggers:
            lg.summary(metrics)

    def image(self, name: str, path: Path) -> None:
        for lg in self.loggers:
            lg.image(name, path)

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        for lg in self.loggers:
            lg.table(name, columns, rows)

    def curves(self, curves: dict[str, dict]) -> None:
        """Every curve of metrics.json (``{split: {curve: {column: list}}}``) as a table
        ``curves/<split>/<curve>``; bin edges (one longer) become lower/upper columns."""
        for split, named in curves.items():
            for curve, cols in named.items():
                columns, rows = curve_table(cols)
                if rows:
                    self.table(f"curves/{split}/{curve}", columns, rows)

    def finish(self, ok: bool = True) -> None:
        for lg in self.loggers:
            lg.finish(ok)


def curve_table(cols: dict[str, list]) -> tuple[list[str], list[list]]:
    """Columns of equal length n as rows; a column of n + 1 edges as lower/upper."""
    lists = {k: v for k, v in cols.items() if isinstance(v, list)}
    if not lists:
        return [], []
    n = min(len(v) for v in lists.values())
    names, columns = [], []
    for k, v in lists.items():
        if len(v) == n:
            names.append(k)
            columns.append(v)
        elif len(v) == n + 1:
            names += [f"{k}_lower", f"{k}_upper"]
            columns += [v[:-1], v[1:]]
    return names, [list(r) for r in zip(*columns, strict=True)]
