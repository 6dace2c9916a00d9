"""The run folder: every file name in it, its lock, and the record of the job it holds.

One job per run folder. What a job leaves there::

    .hydra/             config.yaml (the resolved config), hydra.yaml, overrides.yaml
    .lock               the folder lock ("pid N on HOST" of its holder)
    run.log             the log (appended to by a resumed run)
    metrics.json        flat {name: number} plus "curves"; written last, so it means finished
    error.txt           why the job failed (a new attempt removes it)
    history.jsonl       the training curves, one JSON object per logged step
    predictive/         <set>.npy and fingerprints.json, the posterior predictive per set
    plots/              *.png
    traces.npy          a sampler's test-set chain trace
    samples.msgpack     a sampler's kept samples (method.save_samples=true)
    checkpoint/         map.msgpack, vi.msgpack (for init_from); resume/: run.json and
                        one snapshot folder per loop (``bnn_bench.checkpoint``)
    wandb/              the W&B run's local files

Every module takes these names from here. ``folder_lock`` holds the folder for one job;
``RunRecord`` (``checkpoint/resume/run.json``) says which job the folder holds, and so
``RunRecord.decide`` whether a job starts anew, resumes or skips (finished here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnn_bench.errors import UserError

log = logging.getLogger(__name__)

# --- the names -------------------------------------------------------------------------------

HYDRA = ".hydra"  # what Hydra writes, inside it: CONFIG, HYDRA_CONFIG, OVERRIDES
CONFIG, HYDRA_CONFIG, OVERRIDES = "config.yaml", "hydra.yaml", "overrides.yaml"
LOCK = ".lock"
RUN_LOG = "run.log"
METRICS = "metrics.json"
ERROR = "error.txt"
HISTORY = "history.jsonl"
PREDICTIVE = "predictive"
FINGERPRINTS = "fingerprints.json"  # inside predictive/
PLOTS = "plots"
TRACES = "traces.npy"
SAMPLES = "samples.msgpack"
CHECKPOINT = "checkpoint"
MAP_POINT = Path(CHECKPOINT) / "map.msgpack"  # a MAP fit's network, for init_from
VI_POSTERIOR = Path(CHECKPOINT) / "vi.msgpack"
RESUME = Path(CHECKPOINT) / "resume"  # RUN_RECORD and one folder per checkpointed loop
RUN_RECORD = "run.json"
WANDB = "wandb"

# what a job leaves in its run folder (besides .hydra/ and run.log); a new job removes them
RESULTS = (METRICS, HISTORY, ERROR, SAMPLES, TRACES, CHECKPOINT, PLOTS, PREDICTIVE, WANDB)

# Overrides that say how to run, not what: left out of run names and job identity.
NOT_IDENTITY = ("resume", "logger", "device", "checkpoint")
# how-to-run keys that never change what a job computes
HOW_TO_RUN = (*NOT_IDENTITY, "dry_run", "objective")


def identity(config: dict) -> dict:
    """What a run computes: its resolved config without the how-to-run keys."""
    return json.loads(
        json.dumps({k: v for k, v in config.items() if k not in HOW_TO_RUN}, default=str)
    )


def write_hydra(cfg: Any, out_dir: str | Path) -> None:
    """``.hydra/`` as Hydra writes it, when ``out_dir`` is the folder of the Hydra job
    running now (``run`` called directly writes none). ``hydra.output_subdir`` is null in
    conf/config.yaml, so that nothing lands in the folder before its lock is held and the
    job's decision is made."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    # the folder check: Hydra's state outlives a job that ran in this process (and a
    # composed config that never ran, e.g. --cfg, has no output folder)
    running = HydraConfig.initialized() and OmegaConf.select(
        HydraConfig.get(), "runtime.output_dir", default=None, throw_on_missing=False
    )
    if not running or Path(running).resolve() != Path(out_dir).resolve():
        return
    folder = Path(out_dir) / HYDRA
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / CONFIG)
    OmegaConf.save(HydraConfig.instance().cfg, folder / HYDRA_CONFIG)
    OmegaConf.save(HydraConfig.get().overrides.task, folder / OVERRIDES)


# --- the lock --------------------------------------------------------------------------------


class FolderBusy(UserError):
    """Another process holds the run folder's lock."""


_held: dict[Path, list[int]] = {}  # run folder -> [lock fd, nesting depth]


@contextlib.contextmanager
def folder_lock(out_dir: str | Path) -> Iterator[None]:
    """Holds ``<out_dir>/.lock`` (``fcntl.flock``, exclusive) while inside: one job per
    run folder. Take it before writing anything there. The OS releases it when the
    holder dies, so a crashed run never blocks its own resume. Re-entrant in a process.

    Raises:
      FolderBusy: at once, when another process holds the folder.
    """
    import fcntl
    import socket

    path = Path(out_dir).resolve()
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise FolderBusy(
            f"run folder {path} is in use by {holder}: one job per run folder. Wait for it "
            f"to end, or give this job another folder (hydra.run.dir=..., or a new "
            f"hydra.sweep.dir for a multirun)."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder(os.getpid(), socket.gethostname()).encode(), 0)
    _held[path] = [fd, 1]
    try:
        yield
    finally:
        del _held[path]
        os.close(fd)  # releases the lock


def _holder(pid: int, host: str) -> str:
    """What the lock file says of its holder."""
    return f"pid {pid} on {host}"


def lock_holder(out_dir: str | Path) -> tuple[int, str] | None:
    """``(pid, host)`` of the process that last took the folder's lock, from its lock file;
    None when there is none or it is unreadable. The process may have ended since."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        words = (Path(out_dir) / LOCK).read_text().split()  # _holder's "pid N on HOST"
        return int(words[1]), words[3]
    return None


# --- which job a run folder holds ------------------------------------------------------------


class RunRecord:
    """``<run>/checkpoint/resume/run.json``: the job a run folder holds and its tracker id.

    ``decide`` says, before any work, what to do with a run folder:
    ``"skip"`` (this job finished here), ``"resume"`` (continue its checkpoints) or
    ``"new"`` (start afresh; old checkpoints of another job are removed). A folder
    holding another job's finished results (metrics.json) is refused, not cleared,
    unless ``resume=false`` asks for it; an unreadable run.json is refused by name.
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / RESUME
        self.path = self.root / RUN_RECORD
        self.saved: dict = self._read() if self.path.is_file() else {}

    def _read(self) -> dict:
        """run.json's record, or a UserError naming the file when it is unreadable."""
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:  # ValueError: bad JSON, bytes that are not UTF-8
            reason = f"{type(e).__name__}: {e}"
        else:
            if isinstance(saved, dict) and isinstance(saved.get("config", {}), dict):
                return saved
            reason = "not the record bnn-bench writes"
        keep = (
            "keep its results: give this job another folder (hydra.run.dir=..., or a new "
            "hydra.sweep.dir); replace them: delete the file and run with resume=false"
            if (self.out_dir / METRICS).is_file()
            else "delete the file to run this job afresh there, or give it another folder"
        )
        raise UserError(
            f"{self.path} is unreadable ({reason}); it names the job the folder holds. To {keep}."
        )

    @property
    def logger_run_id(self) -> str | None:
        return self.saved.get("logger_run_id")

    def decide(self, config: dict, resume: bool | str) -> str:
        """``"new"``, ``"resume"`` or ``"skip"`` for the job of the resolved ``config``
        with the run's ``resume`` (True, False or ``"auto"``); warns when it resumes or
        replaces another job's checkpoints.

        Raises:
          UserError: ``resume`` is none of those; ``resume=true`` with nothing to
            continue; or the folder holds another job's finished results.
        """
        if resume not in (True, False, "auto"):
            raise UserError(f"resume must be true, false or auto; got {resume!r}.")
        same = bool(self.saved) and self.saved.get("config") == identity(config)
        finished = (self.out_dir / METRICS).is_file()
        has_state = self.root.is_dir() and any(p.is_dir() for p in self.root.iterdir())
        if resume is False:
            return "new"
        if same and finished:
            return "skip"
        if has_state and (same or resume is True):
            if not same:
                log.warning("resume=true: continuing %s although its config differs.", self.out_dir)
            return "resume"
        if resume is True:
            raise UserError(
                f"resume=true, but {self.out_dir} holds no checkpoint to continue. Give the "
                f"folder of the interrupted run: hydra.run.dir=<run folder> (a multirun: "
                f"hydra.sweep.dir=<sweep folder>).{_candidates(self.out_dir, config)}"
            )
        if finished:  # never cleared by another job; resume=false is the explicit way
            raise UserError(
                f"{self.out_dir} holds the finished results (metrics.json) of another job "
                f"({_difference(self.saved, identity(config))}); this job would clear them. "
                f"To keep them, give this job another folder (hydra.run.dir=..., or a new "
                f"hydra.sweep.dir); to replace them, run it with resume=false."
            )
        if self.saved and not same:
            log.warning("%s held another job's checkpoints; starting afresh.", self.out_dir)
        return "new"

    def start(self, config: dict, decision: str) -> None:
        """Records the job; for a ``new`` run first clears the folder of an earlier
        job's results, checkpoints and log (a rerun must not leave another job's
        metrics.json, plots or history behind). An old ``error.txt`` always goes."""
        (self.out_dir / ERROR).unlink(missing_ok=True)
        if decision == "new":
            held = any((self.out_dir / name).exists() for name in RESULTS)
            for name in RESULTS:
                path = self.out_dir / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            if held and (self.out_dir / RUN_LOG).is_file():
                os.truncate(self.out_dir / RUN_LOG, 0)  # the log is opened for appending
            if held:
                log.warning("%s held an earlier job's results; cleared them.", self.out_dir)
        attempts = int(self.saved.get("attempts", 0)) + 1 if decision == "resume" else 1
        keep_id = self.logger_run_id if decision == "resume" else None
        self.saved = {"config": identity(config), "attempts": attempts, "logger_run_id": keep_id}
        self._write()

    def set_logger_run_id(self, run_id: str | None) -> None:
        """Keeps the tracker's run id with the checkpoints: a resumed run continues it."""
        self.saved["logger_run_id"] = run_id
        self._write()

    def _write(self) -> None:
        # imported here: reporting.outputs takes this module's names
        from bnn_bench.reporting.outputs import write_json_atomic

        write_json_atomic(self.path, self.saved)


def _difference(saved: dict, config: dict) -> str:
    """How the job a run folder holds differs from ``config``, in a few words."""
    if not saved:
        return f"no {RESUME / RUN_RECORD} names it"
    paths: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        elif a != b:
            paths.append(prefix)

    walk(saved.get("config", {}), config, "")
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return f"its config differs in {shown}"


def _candidates(out_dir: Path, config: dict) -> str:
    """Run folders near ``out_dir`` holding a checkpoint of the same job, newest first."""
    if len(out_dir.parents) < 2:
        return ""
    found = []
    for p in out_dir.parents[1].glob(f"*/*/{RESUME / RUN_RECORD}"):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a broken run.json
            if json.loads(p.read_text()).get("config") == identity(config):
                found.append(p.parents[2])
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return (
        (" Interrupted runs of this job: " + ", ".join(map(str, found[:3])) + ".") if found else ""
    )
