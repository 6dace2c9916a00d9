"""Multirun bookkeeping: a failed job leaves ``error.txt`` and the sweep goes on.

Each job that stops with an error writes the message into ``<run>/error.txt`` and
returns, so Hydra's launcher starts the next job. ``FailedJobs``, a Hydra callback
(``hydra.callbacks`` in ``conf/config.yaml``), lists at the end of the launch the
jobs whose ``error.txt`` this launch wrote, and exits non-zero. It reads the files,
not the launcher's return values, so it works the same for jobs that ran in this
process (the basic launcher) and in others (submitit, SLURM). A dry run writes no
files: its jobs report to this process, which is why ``dry_run=true`` runs with
the basic launcher only (and the basic sweeper: a dry run has no objective value to
give Optuna).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

ERROR_FILE = "error.txt"

# (run folder, overrides, error message or None) of the dry-run jobs of this process
_dry_runs: list[tuple[str, str, str | None]] = []


def write_error(out_dir: str | Path, message: str) -> Path:
    """Writes ``message`` to ``<out_dir>/error.txt`` (atomically: a reader never sees half)."""
    path = Path(out_dir) / ERROR_FILE
    tmp = path.with_name(f".{ERROR_FILE}.tmp")
    tmp.write_text(message.rstrip() + "\n")
    tmp.replace(path)
    return path


def record_dry_run(out_dir: str | Path, overrides: list[str], error: str | None) -> None:
    """Notes a dry-run job's outcome for the end-of-sweep summary."""
    _dry_runs.append((str(out_dir), ",".join(overrides), error))


def _overrides(folder: Path) -> str:
    path = folder / ".hydra" / "overrides.yaml"
    try:
        return ",".join(OmegaConf.load(path))  # type: ignore[arg-type]
    except (OSError, ValueError):
        return ""


def _errors(sweep_dir: Path) -> dict[Path, tuple[int, int]]:
    """Every ``error.txt`` below ``sweep_dir`` with its (mtime_ns, size)."""
    found = {}
    for path in sweep_dir.rglob(ERROR_FILE) if sweep_dir.is_dir() else ():
        st = path.stat()
        found[path] = (st.st_mtime_ns, st.st_size)
    return found


def _job_order(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), "") if name.isdigit() else (sys.maxsize, str(path))


class FailedJobs(Callback):
    """Lists the failed jobs of a multirun at its end and exits non-zero if any failed."""

    def __init__(self) -> None:
        self._before: dict[Path, tuple[int, int]] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        del kwargs
        _dry_runs.clear()
        if config.get("dry_run") is True:
            for part in ("launcher", "sweeper"):
                target = str(OmegaConf.select(config, f"hydra.{part}._target_", default=""))
                if not target.endswith(f"Basic{part.capitalize()}"):
                    print(
                        f"bnn-bench: error: dry_run=true checks a sweep on this machine, with "
                        f"Hydra's basic launcher and sweeper; drop the hydra/{part} override "
                        f"({target.rsplit('.', 1)[-1]}).",
                        file=sys.stderr,
                    )
                    sys.exit(2)
        # error.txt files already there belong to earlier launches; a job of this launch
        # removes its old one when it starts and writes a new one when it fails
        self._before = _errors(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        del kwargs
        if config.get("dry_run") is True:
            self._dry_run_summary()
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        now = _errors(sweep_dir)
        failed = sorted((p for p, st in now.items() if self._before.get(p) != st), key=_job_order)
        if not failed:
            return
        lines = [f"bnn-bench: {len(failed)} job(s) of this sweep failed:"]
        for path in failed:
            first = path.read_text().strip().splitlines()[0] if path.stat().st_size else ""
            lines.append(f"  {path.parent}  [{_overrides(path.parent)}]\n      {first}")
        lines.append(
            f"Each folder's {ERROR_FILE} has the message. After a fix, re-launch the same "
            f"command with hydra.sweep.dir={sweep_dir}: finished jobs are skipped, failed "
            f"and interrupted ones run again."
        )
        print("\n".join(lines), file=sys.stderr)
        sys.exit(1)

    @staticmethod
    def _dry_run_summary() -> None:
        bad = [(d, o, e) for d, o, e in _dry_runs if e is not None]
        print(f"dry run: {len(_dry_runs)} job(s) checked, {len(bad)} would fail.")
        if bad:
            lines = ["bnn-bench: these jobs would fail:"]
            lines += [f"  #{Path(d).name} [{o}]\n      {e.splitlines()[0]}" for d, o, e in bad]
            print("\n".join(lines), file=sys.stderr)
            sys.exit(1)
