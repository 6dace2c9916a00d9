"""The run folders below some folders, and the state of each one's job (``survey``).

A run folder is one holding ``.hydra/``, ``metrics.json`` or ``error.txt``. Its job is
finished (a readable metrics.json), failed (``error.txt``), crashed (``error.txt`` with a
traceback), running (no metrics.json; the process holding its lock is alive on this
host), unfinished (neither: interrupted or killed) or unreadable (a metrics.json or
``.hydra/`` file that does not parse); a job of a sweep's last launch without a folder is
missing. Two folders of the same job (the same resolved config, seed included) count
once, the newest.

Old ``metrics.json`` files are read through ``OLD_KEYS``, which maps a metric key an
earlier version wrote to its current name; ``Survey.translated`` names each file read so.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bnn_bench.reporting.loggers import override_key, read_overrides
from bnn_bench.run_folder import (
    CONFIG,
    ERROR,
    HYDRA,
    METRICS,
    NOT_IDENTITY,
    OVERRIDES,
    RESUME,
    RUN_RECORD,
    identity,
    lock_holder,
)

# a job's states, in the order the status lists them
STATES = ("finished", "failed", "crashed", "running", "unfinished", "missing", "unreadable")
# run.py's timed stages, in order; their sum is a run's wall time (time/total)
STAGES = ("time/setup", "time/fit", "time/predict", "time/evaluate")

# {old metric key: its current key}, applied when a metrics.json is read, so runs written
# before a rename compare with runs written after it. A key ``*/name`` stands for ``name``
# in every set (``test/name``, ``val/name``, ``shift/rotate/15/name``, ...) and maps to a
# ``*/new`` key. A file holding both keys keeps the current one's value.
OLD_KEYS: dict[str, str] = {
    # issue 22's glossary (docs/glossary.md)
    "temperature/T": "temperature/logit_temperature",
    "laplace/time_map": "time/map",
    "hmc/warmup_acceptance_rate": "hmc/burn_in_acceptance_rate",
    "hmc/warmup_transitions_per_s": "hmc/burn_in_transitions_per_s",
}


@dataclass
class Run:
    """One finished run: its folder, overrides (``{key: value}``) and metrics.json;
    ``job``: what it computes (its resolved config, how-to-run keys left out)."""

    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float]
    curves: dict = field(default_factory=dict)
    job: str = ""
    renamed: dict[str, str] = field(default_factory=dict)  # {old key: new key} (OLD_KEYS)


@dataclass
class Job:
    """A job without results to compare: its state (``STATES``), the file or folder that
    says so, the reason in a few words, its overrides and what it computes."""

    state: str
    path: Path
    reason: str
    overrides: dict[str, str]
    job: str = ""


@dataclass
class Survey:
    """What the folders hold: finished runs (each job once), the jobs without results
    (one entry per job), the folders left out as duplicates of a counted job, and the
    finished folders whose metrics.json had old metric keys (``OLD_KEYS``)."""

    runs: list[Run]
    jobs: list[Job]
    duplicates: list[Job]
    translated: list[Run] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Jobs per state (``finished`` first)."""
        out = dict.fromkeys(STATES, 0)
        out["finished"] = len(self.runs)
        for j in self.jobs:
            out[j.state] += 1
        return out


def find_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Every finished run below ``dirs``, each job once (sorted by path); see ``survey``."""
    return survey(dirs).runs


def survey(dirs: Sequence[str | Path]) -> Survey:
    """Every run folder below ``dirs`` and the state of its job, each job counted once.

    A folder is a run folder when it holds ``.hydra/``, ``metrics.json`` or ``error.txt``.
    Two finished folders of the same job (same resolved config, seed included) keep the
    newest metrics.json; the others are listed as duplicates. A sweep folder made with
    job folders named by their overrides (conf/config.yaml) also gives the jobs of its
    last launch that have no folder (missing).
    """
    folders: set[Path] = set()
    for d in dirs:
        d = Path(d)
        for pattern in (METRICS, ERROR):
            folders.update(p.parent.resolve() for p in d.rglob(pattern))
        folders.update(p.parent.resolve() for p in d.rglob(HYDRA) if p.is_dir())
    runs: list[Run] = []
    jobs: list[Job] = []
    for folder in sorted(folders):
        entry = _read_folder(folder)
        (runs if isinstance(entry, Run) else jobs).append(entry)
    for d in dirs:
        jobs += _missing(Path(d), folders)
    # each job once: the newest finished folder counts; a job that finished somewhere is
    # not also unfinished elsewhere (an older launch's folder)
    newest: dict[str, Run] = {}
    for r in runs:
        kept = newest.get(r.job)
        if kept is None or _mtime(r.path) > _mtime(kept.path):
            newest[r.job] = r
    duplicates = [
        Job("duplicate", r.path, f"the same job as {newest[r.job].path} (newer)", r.overrides)
        for r in runs
        if newest[r.job] is not r
    ]
    pending: dict[str, Job] = {}
    for j in jobs:
        if j.job in newest:
            duplicates.append(
                Job(
                    "duplicate",
                    j.path,
                    f"{j.state}: {j.reason}; the same job finished in {newest[j.job].path}",
                    j.overrides,
                )
            )
        elif j.job in pending and j.state != "missing":
            duplicates.append(
                Job(
                    "duplicate",
                    j.path,
                    f"{j.state}: {j.reason}; the same job as {pending[j.job].path}",
                    j.overrides,
                )
            )
        else:
            pending.setdefault(j.job, j)
    counted = [r for r in runs if newest[r.job] is r]
    translated = [r for r in runs if r.renamed]
    return Survey(counted, list(pending.values()), duplicates, translated)


def _mtime(folder: Path) -> int:
    with contextlib.suppress(OSError):
        return (folder / METRICS).stat().st_mtime_ns
    return 0


def _overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``{key: value}`` of the overrides that say what a run computes."""
    out = {}
    for o in overrides:
        key = override_key(o)
        if key.split(".")[0] not in NOT_IDENTITY:
            out[key] = o.split("=", 1)[1] if "=" in o else ""
    return out


def _job_of(folder: Path, overrides: Sequence[str]) -> str:
    """What a run computes, as one string: its resolved config (``.hydra/config.yaml``,
    else ``checkpoint/resume/run.json``) without how-to-run keys; else its overrides."""
    from omegaconf import OmegaConf

    from bnn_bench.sweep import job_overrides

    config = None
    with contextlib.suppress(Exception):  # an unresolvable or broken file: the next source
        loaded = OmegaConf.load(folder / HYDRA / CONFIG)
        try:
            config = OmegaConf.to_container(loaded, resolve=True)
        except Exception:  # noqa: BLE001 - e.g. an interpolation of a key no longer there
            config = OmegaConf.to_container(loaded)
    if not isinstance(config, dict):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            config = json.loads((folder / RESUME / RUN_RECORD).read_text())["config"]
    if isinstance(config, dict):
        return "config " + json.dumps(identity(config), sort_keys=True)
    return "overrides " + ",".join(job_overrides(overrides))


def _read_folder(folder: Path) -> Run | Job:
    """A finished ``Run``, or the ``Job`` saying why the folder has no results."""
    try:
        listed = read_overrides(folder)
    except Exception as e:  # noqa: BLE001 - whatever the YAML parser raises
        return Job("unreadable", folder / HYDRA / OVERRIDES, _why(e), {}, str(folder))
    overrides, job = _overrides(listed), _job_of(folder, listed)
    metrics_path = folder / METRICS
    if metrics_path.is_file():
        try:
            payload = json.loads(metrics_path.read_text())
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            return Job("unreadable", metrics_path, _why(e), overrides, job)
        curves = payload.pop("curves", {})
        metrics, renamed = translate(
            {k: v for k, v in payload.items() if isinstance(v, int | float)}
        )
        if "time/total" not in metrics and all(k in metrics for k in STAGES):
            metrics["time/total"] = float(sum(metrics[k] for k in STAGES))
        curves = curves if isinstance(curves, dict) else {}
        return Run(folder, overrides, metrics, curves, job, renamed)
    error = folder / ERROR
    if error.is_file():
        text = error.read_text(errors="replace").strip()
        first = text.splitlines()[0] if text else "(empty)"
        state = "crashed" if "Traceback (most recent call last)" in text else "failed"
        return Job(state, error, first, overrides, job)
    holder = _live_holder(folder)
    if holder:
        return Job("running", folder, f"no metrics.json yet; held by {holder}", overrides, job)
    return Job(
        "unfinished",
        folder,
        "no metrics.json (interrupted or killed; re-launch the same command to continue it)",
        overrides,
        job,
    )


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def _live_holder(folder: Path) -> str | None:
    """``pid N`` when the process that took the folder's lock runs on this host still."""
    holder = lock_holder(folder)
    if holder is None or holder[1] != socket.gethostname():
        return None
    pid, host = holder
    with contextlib.suppress(OSError):
        os.kill(pid, 0)  # signal 0: is it alive (and ours to ask)?
        return f"pid {pid} on {host}"
    return None


def _last_launch(sweep_dir: Path) -> list[list[str]]:
    """The jobs (their overrides) of the sweep's last launch, from its multirun.yaml, when
    its jobs' folders are named by their overrides and Hydra's basic sweeper made them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    try:
        hydra = OmegaConf.load(path).hydra
        if "bnn_bench.job_dir" not in str(OmegaConf.to_container(hydra.sweep)["subdir"]):
            return []  # numbered job folders (an older bnn-bench): the names cannot be known
        if not str(hydra.sweeper._target_).endswith("BasicSweeper"):
            return []  # another sweeper (Optuna) picks its jobs as it goes
        params = [f"{k}={v}" for k, v in (hydra.sweeper.params or {}).items()]
        lines = [*params, *(str(o) for o in hydra.overrides.task)]
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        (batch,) = BasicSweeper.split_arguments(
            OverridesParser.create().parse_overrides(lines), None
        )
    except Exception:  # noqa: BLE001 - an unreadable multirun.yaml only loses the missing jobs
        return []
    return [list(job) for job in batch]


def _missing(sweep_dir: Path, folders: set[Path]) -> list[Job]:
    """The jobs of the sweep's last launch that have no folder below ``sweep_dir`` (by
    name, or by the overrides a folder holds: one named otherwise by an older bnn-bench)."""
    from bnn_bench.sweep import job_dir, job_overrides

    jobs = _last_launch(sweep_dir)
    held = set()
    for f in folders if jobs else ():
        with contextlib.suppress(Exception):  # an unreadable folder is listed on its own
            held.add(tuple(job_overrides(read_overrides(f))))
    out = []
    for overrides in jobs:
        folder = (sweep_dir / job_dir(overrides)).resolve()
        if folder not in folders and tuple(job_overrides(overrides)) not in held:
            out.append(
                Job(
                    "missing",
                    folder,
                    "no folder: the job has not started",
                    _overrides(overrides),
                    "overrides " + ",".join(job_overrides(overrides)),
                )
            )
    return out


def translate(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """``metrics`` with every old key (``OLD_KEYS``) under its current name, and
    ``{old key: new key}`` of those renamed. Where both are there the current key's value
    stays."""
    renamed = {k: new for k in metrics if (new := _current(k)) != k}
    out = {k: v for k, v in metrics.items() if k not in renamed}
    for old, new in renamed.items():
        out.setdefault(new, metrics[old])
    return out, renamed


def _current(key: str) -> str:
    """The current name of the metric ``key`` (itself unless ``OLD_KEYS`` renames it)."""
    if key in OLD_KEYS:
        return OLD_KEYS[key]
    prefix, _, name = key.rpartition("/")
    new = OLD_KEYS.get(f"*/{name}") if prefix else None
    return f"{prefix}/{new.removeprefix('*/')}" if new else key
