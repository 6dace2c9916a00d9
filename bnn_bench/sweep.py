"""Multirun bookkeeping: a job's folder is named by its overrides; a failed job leaves
``error.txt`` and the sweep goes on.

A job of a sweep is known by what it runs, not by its number: its folder below the
sweep folder is named by its overrides (``job_dir``, the ``bnn_bench.job_dir``
resolver of ``hydra.sweep.subdir`` in conf/config.yaml), so a re-launch with another
value list finds each job's results where that job left them.

Each job that stops with an error writes the message into ``<run>/error.txt`` and
returns, so Hydra's launcher starts the next job. ``FailedJobs``, a Hydra callback
(``hydra.callbacks`` in ``conf/config.yaml``), lists at the end of the launch the
jobs whose ``error.txt`` this launch wrote, and exits non-zero. It reads the files,
not the launcher's return values, so it works the same for jobs that ran in this
process (the basic launcher) and in others (submitit, SLURM). A dry run writes no
files: its jobs report to this process, which is why ``dry_run=true`` runs with
the basic launcher only (and the basic sweeper: a dry run has no objective value to
give Optuna). A job that fails in a folder holding finished results writes no
``error.txt`` there (it would mark those results as failed); ``FailedJobs`` lists it
from this process's record (``record_refused``; the basic launcher's jobs).

``Preflight``, another callback, stops a launch in one line (exit 2) before Hydra makes a
folder or submits a job: an output folder that cannot be written, a SLURM launcher
without ``sbatch``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bnn_bench.run_folder import ERROR, HOW_TO_RUN, HYDRA, OVERRIDES

# (job label, overrides, error message or None) of the dry-run jobs of this process
_dry_runs: list[tuple[str, str, str | None]] = []
# (run folder, overrides, message) of the jobs of this process that failed without an
# error.txt: their folder held another job's finished results, which stay untouched
_refused: list[tuple[str, str, str]] = []

# A job folder's name is ``key:value`` per override, joined by ``+``: characters that need
# no quotes in a Hydra override, so the folder can be handed back as one (hydra.run.dir=,
# method.init_from=, eval.reference=). An override of other characters (``/`` of a group
# override, brackets, quotes, spaces, ``+`` or ``:`` in a value) makes the name a readable
# prefix plus a hash of the overrides.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.@-]+")
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.%@-]*")
_MAX_NAME = 120  # characters of a job's folder name (file systems allow 255 bytes)


def job_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that say what a job computes, sorted, without a leading ``+``: the
    how-to-run keys (``resume``, ``logger``, ``device``, ``checkpoint``, ``dry_run``,
    ``objective``) are left out, so that re-launching with ``resume=true`` or another
    logger finds the same job."""
    from bnn_bench.reporting.loggers import override_key

    kept = (str(o) for o in overrides if override_key(str(o)).split(".")[0] not in HOW_TO_RUN)
    return sorted(o.lstrip("+") for o in kept)


def job_dir(overrides: Sequence[str]) -> str:
    """A sweep job's folder name, from its overrides: ``method:map+seed:0`` for
    ``method=map seed=0`` (sorted; ``default`` for none). Where an override has other
    characters than ``[A-Za-z0-9_.@-]`` in its key or ``[A-Za-z0-9_.%@-]`` in its value,
    or the name would be longer than 120, it is a readable prefix plus ``-`` and 8 hex
    digits of the overrides' SHA-256: one job, one folder, whatever the launch or the
    job's number.

    Args:
      overrides: the job's task overrides (``hydra.overrides.task``).
    """
    items = [o.partition("=") for o in job_overrides(overrides)]
    if not items:
        return "default"
    name = "+".join(f"{k}:{v}" for k, _, v in items)
    plain = all(_PLAIN_KEY.fullmatch(k) and _PLAIN_VALUE.fullmatch(v) for k, _, v in items)
    if plain and len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(",".join(f"{k}={v}" for k, _, v in items).encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9_.:+%@-]", "_", name)[: _MAX_NAME - 9]
    return f"{readable}-{digest}"


def _register_resolver() -> None:
    if not OmegaConf.has_resolver("bnn_bench.job_dir"):
        OmegaConf.register_new_resolver(
            "bnn_bench.job_dir", lambda overrides: job_dir(list(overrides))
        )


_register_resolver()


def write_error(out_dir: str | Path, message: str) -> Path:
    """Writes ``message`` to ``<out_dir>/error.txt`` (atomically: a reader never sees half)."""
    path = Path(out_dir) / ERROR
    tmp = path.with_name(f".{ERROR}.tmp")
    tmp.write_text(message.rstrip() + "\n")
    tmp.replace(path)
    return path


def record_dry_run(out_dir: str | Path, overrides: list[str], error: str | None) -> None:
    """Notes a dry-run job's outcome for the end-of-sweep summary (as ``#<job number>``)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    try:
        label = f"#{HydraConfig.get().job.num}"
    except (ValueError, OmegaConfBaseException):  # outside a Hydra job; a single run
        label = Path(out_dir).name
    _dry_runs.append((label, ",".join(overrides), error))


def record_refused(out_dir: str | Path, overrides: list[str], message: str) -> None:
    """Notes a job that failed in a folder holding finished results, where it writes no
    ``error.txt`` (that would mark those results as failed), for the end-of-sweep list."""
    _refused.append((str(out_dir), ",".join(overrides), message))


def _overrides(folder: Path) -> str:
    path = folder / HYDRA / OVERRIDES
    try:
        return ",".join(OmegaConf.load(path))  # type: ignore[arg-type]
    except (OSError, ValueError):
        return ""


def _errors(sweep_dir: Path) -> dict[Path, tuple[int, int]]:
    """Every ``error.txt`` below ``sweep_dir`` with its (mtime_ns, size)."""
    found = {}
    for path in sweep_dir.rglob(ERROR) if sweep_dir.is_dir() else ():
        st = path.stat()
        found[path] = (st.st_mtime_ns, st.st_size)
    return found


class FailedJobs(Callback):
    """Lists the failed jobs of a multirun at its end and exits non-zero if any failed."""

    def __init__(self) -> None:
        self._before: dict[Path, tuple[int, int]] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        del kwargs
        _dry_runs.clear()
        _refused.clear()
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
        failed = sorted(p for p, st in now.items() if self._before.get(p) != st)
        if not failed and not _refused:
            return
        lines = [f"bnn-bench: {len(failed) + len(_refused)} job(s) of this sweep failed:"]
        for path in failed:
            first = path.read_text().strip().splitlines()[0] if path.stat().st_size else ""
            lines.append(f"  {path.parent}  [{_overrides(path.parent)}]\n      {first}")
        for folder, overrides, message in _refused:
            lines.append(f"  {folder}  [{overrides}]\n      {message.splitlines()[0]}")
        lines.append(
            f"Each folder's {ERROR} has the message. After a fix, re-launch the same "
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
            lines += [f"  {d} [{o}]\n      {e.splitlines()[0]}" for d, o, e in bad]
            print("\n".join(lines), file=sys.stderr)
            sys.exit(1)


def _refuse(message: str) -> None:
    print(f"bnn-bench: error: {message}", file=sys.stderr)
    sys.exit(2)


def writable_folder_problem(folder: str | Path) -> str | None:
    """Why nothing can be written at ``folder`` (it or the nearest existing folder above
    it is not writable, or is a file), or None. Probes with an anonymous temporary file,
    which leaves nothing behind."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        return f"{existing} is not writable ({e.strerror or e})"
    return None


class Preflight(Callback):
    """Checks, before Hydra creates any folder or submits any job, that the output folder
    (``hydra.run.dir``, ``hydra.sweep.dir``) can be written and that a SLURM launcher has
    SLURM (``sbatch`` on the PATH); else one line and exit 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        del kwargs
        self._writable(config.hydra.run.dir, "hydra.run.dir", "run folder")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        del kwargs
        target = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        if target.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
            choice = OmegaConf.select(config, "hydra.runtime.choices.hydra/launcher")
            _refuse(
                f"hydra/launcher={choice or 'submitit_slurm'} submits the jobs to SLURM, but "
                f"there is no sbatch on the PATH here. Launch from a SLURM login node, or "
                f"run the jobs on this machine: drop the override (one after another) or "
                f"use hydra/launcher=submitit_local."
            )
        self._writable(config.hydra.sweep.dir, "hydra.sweep.dir", "sweep folder")

    @staticmethod
    def _writable(folder: str, key: str, what: str) -> None:
        problem = writable_folder_problem(folder)
        if problem is not None:
            _refuse(
                f"cannot write the {what} {folder}: {problem}. Give one you can write "
                f"to: {key}=<folder>."
            )
