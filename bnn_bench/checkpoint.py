"""Checkpoint and resume: atomic snapshots of a loop's state, SIGTERM handling.

A run keeps its resume state in ``<run>/checkpoint/resume/``: ``run.json`` (what
the job computes, its W&B run id) and one folder per checkpointed loop, named
``<loop>-<i>`` in the order the loops start (``trainer-0``, ``trainer-1`` for a
second network, ``sgmcmc-0``, ...), so a resumed run finds each loop's state
again by replaying the same calls.

For loop authors, a few lines (the trainer loop in ``methods/training.py`` is
the example)::

    from bnn_bench import checkpoint

    ckpt = checkpoint.loop("sgmcmc")              # no-op outside a run
    step, state = 0, init_state                    # any pytree: NamedTuple states,
    restored = ckpt.restore(state)                 #   typed PRNG keys, summaries
    if restored is not None:
        step, state = restored                     # same structure as the template
    while step < total:
        state = run_chunk(state, ...)              # one jitted lax.scan
        step += size
        ckpt.maybe_save(step, state)               # every ``checkpoint.every`` chunks
    ckpt.maybe_save(step, state, final=True)       # the finished loop restores at once

``maybe_save`` is where preemption lands: after SIGTERM (SLURM's preemption
signal) it saves and raises ``Preempted``; ``bnn-bench`` then exits with
143 and the command to continue. A loop must derive every random key from its
input key and the step (``fold_in(key, step)``) or keep the key in the saved
pytree, so that a resumed loop draws what an uninterrupted one would.

Atomicity: a checkpoint is written into a temporary folder, flushed to disk and
renamed to ``step_<n>``; the previous checkpoint is deleted only after that, so
a process killed mid-write leaves the previous one usable. Leaves are stored
with ``flax.serialization`` (msgpack); typed PRNG keys as their key data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from bnn_bench.errors import UserError
from bnn_bench.reporting.loggers import NOT_IDENTITY  # how-to-run keys: may change on resume
from bnn_bench.reporting.outputs import write_json_atomic

log = logging.getLogger(__name__)

STATE_FILE, META_FILE = "state.msgpack", "meta.json"


class Preempted(BaseException):  # noqa: N818 - it is an event, not an error
    """The run was asked to stop (SIGTERM, SIGINT) and saved its state where it could.

    A BaseException, as KeyboardInterrupt: library code that catches Exception
    (a download retry, a launcher) must not swallow a stop request."""

    def __init__(self, signum: int, step: int | None = None, path: Path | None = None):
        where = f" after saving step {step} to {path}" if path is not None else ""
        super().__init__(f"stopped by {signal.Signals(signum).name}{where}")
        self.signum, self.step, self.path = signum, step, path


# --- the stop request (signal handler) -----------------------------------------------------

# SIGTERM: SLURM's preemption; SIGINT: Ctrl-C. Both stop a run the same way.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_stop: dict[str, Any] = {"signum": None, "previous": {}, "loops": 0, "depth": 0}


def _on_signal(signum, frame):
    del frame
    if _stop["loops"] == 0:  # no loop running, nothing to save: requeue or stop at once
        _chain_and_raise(signum, None, None)
    log.warning(
        "%s received: saving a checkpoint at the end of this chunk, then stopping.",
        signal.Signals(signum).name,
    )
    _stop["signum"] = signum


def stop_requested() -> int | None:
    """The signal that asked the run to stop, or None."""
    return _stop["signum"]


def _chain_and_raise(signum: int, step: int | None, path: Path | None) -> None:
    """After saving: hand over to a handler that was there before (submitit's requeue
    on its USR2 signal), else raise ``Preempted``."""
    previous = _stop["previous"].get(signum)
    if callable(previous) and signum not in STOP_SIGNALS:
        previous(signum, None)  # submitit: requeue the job and exit
    raise Preempted(signum, step, path)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within: ``signals`` (and submitit's preemption signal) ask the run to stop.

    Inside a checkpointed loop the loop saves at the end of its chunk, then raises
    ``Preempted``; outside one ``Preempted`` is raised at once (the last checkpoint
    is all there is to keep). Restores the previous handlers on exit. Only the main
    thread can catch signals; nested uses keep the outer handlers."""
    import threading

    install = _stop["depth"] == 0 and threading.current_thread() is threading.main_thread()
    _stop["depth"] += 1
    if install:
        _stop.update(signum=None, previous={})
        for s in _extra_signals(signals):
            _stop["previous"][s] = signal.signal(s, _on_signal)
    try:
        yield
    finally:
        _stop["depth"] -= 1
        if install:
            for s, previous in _stop["previous"].items():
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
            _stop.update(signum=None, previous={}, loops=0)


# --- one loop's checkpoints ----------------------------------------------------------------


class Checkpointer:
    """Periodic, atomic checkpoints of one loop's pytree in ``directory``.

    Args:
      directory: where ``step_<n>/`` folders go; None disables saving (restore
        finds nothing), e.g. outside a run.
      every: save every this many ``maybe_save`` calls (chunks) and when the loop
        ends; 0 saves only on SIGTERM.
      keep: complete checkpoints kept (>= 1; the newest are kept).
    """

    def __init__(self, directory: str | Path | None, every: int = 0, keep: int = 1):
        self.directory = None if directory is None else Path(directory)
        self.every, self.keep = int(every), max(1, int(keep))
        self._chunks = 0
        self._open = False
        if self.directory is not None and self.directory.is_dir():
            for tmp in self.directory.glob(".tmp-*"):  # left by a process killed mid-write
                shutil.rmtree(tmp, ignore_errors=True)

    # -- reading
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if self.directory is None or not self.directory.is_dir():
            return []
        return sorted(
            int(p.name.split("_")[1])
            for p in self.directory.glob("step_*")
            if (p / META_FILE).is_file()
        )

    def restore(self, template: Any) -> tuple[int, Any] | None:
        """The newest readable checkpoint as ``(step, pytree)`` shaped like ``template``,
        or None. Marks the loop as running (SIGTERM then waits for ``maybe_save``)."""
        self._open = True
        _stop["loops"] += 1
        for step in reversed(self.steps()):
            path = self.directory / f"step_{step:09d}"
            try:
                tree = _load(path / STATE_FILE, template)
            except (OSError, ValueError) as e:
                log.warning("checkpoint %s is unreadable (%s); trying an older one.", path, e)
                continue
            log.info("resuming %s from step %d", self.directory.name, step)
            return step, tree
        return None

    # -- writing
    def save(self, step: int, tree: Any) -> Path | None:
        """Writes ``tree`` as ``step_<step>`` atomically; drops older ones beyond ``keep``."""
        if self.directory is None:
            return None
        final = self.directory / f"step_{int(step):09d}"
        if (final / META_FILE).is_file():
            return final  # this step is saved already
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".tmp-step_{int(step):09d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tic = time.perf_counter()
        _write(tmp / STATE_FILE, _dump(tree))
        _write(tmp / META_FILE, json.dumps({"step": int(step), "time": time.time()}).encode())
        _fsync_dir(tmp)
        os.replace(tmp, final)  # the commit point
        _fsync_dir(self.directory)
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self.directory / f"step_{old:09d}", ignore_errors=True)
        log.debug("saved %s in %.2fs", final, time.perf_counter() - tic)
        return final

    def maybe_save(self, step: int, tree: Any, final: bool = False) -> None:
        """Call once per chunk: saves every ``every`` chunks, at ``final`` (when
        ``every`` > 0), and on a stop request, after which it raises ``Preempted``."""
        self._chunks += 1
        signum = stop_requested()
        path = None
        if signum is not None or (self.every and (final or self._chunks % self.every == 0)):
            path = self.save(step, tree)
        if final and self._open:
            self._open = False
            _stop["loops"] -= 1
        if signum is not None:
            _chain_and_raise(signum, step, path)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _dump(tree: Any) -> bytes:
    leaves = jax.tree.leaves(tree)
    arrays = [np.asarray(jax.random.key_data(x) if _is_key(x) else x) for x in leaves]
    return serialization.msgpack_serialize({str(i): a for i, a in enumerate(arrays)})


def _load(path: Path, template: Any) -> Any:
    stored = serialization.msgpack_restore(path.read_bytes())
    leaves, treedef = jax.tree.flatten(template)
    if len(stored) != len(leaves):
        raise UserError(
            f"checkpoint {path} holds {len(stored)} arrays but this run's state has "
            f"{len(leaves)}: it belongs to a different configuration. Start a new "
            f"run folder (or resume=false)."
        )
    out = []
    for i, like in enumerate(leaves):
        value = np.asarray(stored[str(i)])
        if _is_key(like):
            out.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(like)))
            continue
        want = np.shape(like)
        if value.shape != want:
            raise UserError(
                f"checkpoint {path}: array {i} has shape {value.shape}, this run's "
                f"state {want}: a different configuration. Start a new run folder "
                f"(or resume=false)."
            )
        if isinstance(like, jax.Array | np.ndarray):
            out.append(jnp.asarray(value, dtype=like.dtype))
        else:  # a Python scalar
            out.append(type(like)(value.item()))
    return jax.tree.unflatten(treedef, out)


# --- the run's checkpoints -----------------------------------------------------------------

_session: dict[str, Any] = {"root": None, "every": 0, "counts": {}}


def loop(name: str) -> Checkpointer:
    """The checkpointer of the next loop called ``name`` in the active run (the i-th
    call gives ``<root>/<name>-<i>``); a disabled one outside a run."""
    root = _session["root"]
    if root is None:
        return Checkpointer(None)
    i = _session["counts"].get(name, 0)
    _session["counts"][name] = i + 1
    return Checkpointer(Path(root) / f"{name}-{i}", every=_session["every"])


@contextlib.contextmanager
def session(
    root: str | Path, every: int, signals: tuple[int, ...] = STOP_SIGNALS
) -> Iterator[None]:
    """Within: ``loop`` hands out checkpointers under ``root`` and ``signals`` ask the
    run to stop at the next chunk boundary (after a save), as ``stop_on_signals``."""
    _session.update(root=Path(root), every=int(every), counts={})
    _stop.update(signum=None, loops=0)
    try:
        with stop_on_signals(signals):
            yield
    finally:
        _session.update(root=None, every=0, counts={})
        _stop.update(signum=None, loops=0)


def _extra_signals(signals: tuple[int, ...]) -> tuple[int, ...]:
    """``signals`` plus submitit's preemption signal when a submitit job handles it."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    usr = getattr(signal, f"SIG{name}", None)
    if usr is not None and usr not in signals and callable(signal.getsignal(usr)):
        return (*signals, usr)
    return signals


# --- which job a run folder holds ------------------------------------------------------------


# how-to-run keys that never change what a job computes
_HOW_TO_RUN = (*NOT_IDENTITY, "dry_run", "objective")
# what a job leaves in its run folder (besides .hydra/ and run.log); a new job removes them
RESULTS = (
    "metrics.json",
    "history.jsonl",
    "error.txt",
    "samples.msgpack",
    "checkpoint",
    "plots",
    "predictive",
    "wandb",
)
LOCK_FILE = ".lock"


def identity(config: dict) -> dict:
    """What a run computes: its resolved config without the how-to-run keys."""
    return json.loads(
        json.dumps({k: v for k, v in config.items() if k not in _HOW_TO_RUN}, default=str)
    )


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
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
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
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    _held[path] = [fd, 1]
    try:
        yield
    finally:
        del _held[path]
        os.close(fd)  # releases the lock


class RunRecord:
    """``<run>/checkpoint/resume/run.json``: the job a run folder holds and its tracker id.

    ``plan`` decides, before any work, what to do with a run folder:
    ``"skip"`` (this job finished here), ``"resume"`` (continue its checkpoints) or
    ``"new"`` (start afresh; old checkpoints of another job are removed).
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / "checkpoint" / "resume"
        self.path = self.root / "run.json"
        self.saved: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @property
    def logger_run_id(self) -> str | None:
        return self.saved.get("logger_run_id")

    def plan(self, config: dict, resume: bool | str) -> str:
        if resume not in (True, False, "auto"):
            raise UserError(f"resume must be true, false or auto; got {resume!r}.")
        same = bool(self.saved) and self.saved.get("config") == identity(config)
        finished = (self.out_dir / "metrics.json").is_file()
        has_state = any(p.is_dir() for p in self.root.glob("*-*"))
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
        if self.saved and not same:
            log.warning("%s held another job's checkpoints; starting afresh.", self.out_dir)
        return "new"

    def start(self, config: dict, plan: str) -> None:
        """Records the job; for a ``new`` run first clears the folder of an earlier
        job's results, checkpoints and log (a rerun must not leave another job's
        metrics.json, plots or history behind). An old ``error.txt`` always goes."""
        (self.out_dir / "error.txt").unlink(missing_ok=True)
        if plan == "new":
            held = any((self.out_dir / name).exists() for name in RESULTS)
            for name in RESULTS:
                path = self.out_dir / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            if held and (self.out_dir / "run.log").is_file():
                os.truncate(self.out_dir / "run.log", 0)  # the log is opened for appending
            if held:
                log.warning("%s held an earlier job's results; cleared them.", self.out_dir)
        attempts = int(self.saved.get("attempts", 0)) + 1 if plan == "resume" else 1
        keep_id = self.logger_run_id if plan == "resume" else None
        self.saved = {"config": identity(config), "attempts": attempts, "logger_run_id": keep_id}
        write_json_atomic(self.path, self.saved)

    def set_logger_run_id(self, run_id: str | None) -> None:
        """Keeps the tracker's run id with the checkpoints: a resumed run continues it."""
        self.saved["logger_run_id"] = run_id
        write_json_atomic(self.path, self.saved)


def _candidates(out_dir: Path, config: dict) -> str:
    """Run folders near ``out_dir`` holding a checkpoint of the same job, newest first."""
    if len(out_dir.parents) < 2:
        return ""
    found = []
    for p in out_dir.parents[1].glob("*/*/checkpoint/resume/run.json"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(p.read_text()).get("config") == identity(config):
                found.append(p.parents[2])
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return (
        (" Interrupted runs of this job: " + ", ".join(map(str, found[:3])) + ".") if found else ""
    )
