"""Checkpoint and resume: atomic snapshots of a loop's state, SIGTERM handling.

A run keeps its resume state in ``<run>/checkpoint/resume/``: ``run.json`` (what
the job computes, its W&B run id: ``run_folder.RunRecord``) and one folder per
checkpointed loop, named by the loop (``trainer``, ``sgmcmc``, ...), so a resumed
run finds each loop's state by name. A ``Session`` is the run's side of it: ``run.py``
opens one and hands it to the method in the run context, and each loop asks it for
its ``Checkpointer``.
The chunked loop in ``methods/loop.py`` is the one user::

    session = checkpoint.Session(root, every=2)
    with session:                                 # SIGTERM: save at the next chunk end
        ckpt = session.loop("sgmcmc")
        step, state = ckpt.restore(init_state) or (0, init_state)
        while step < total:
            state = run_chunk(state, ...)         # one jitted lax.scan
            step += size
            ckpt.maybe_save(step, state)          # every ``every`` chunks
        ckpt.maybe_save(step, state, final=True)  # the finished loop restores at once

``maybe_save`` is where preemption lands: after SIGTERM (SLURM's preemption
signal) it saves and raises ``Preempted``; ``bnn-bench`` then exits with
143 and the command to continue. A loop must derive every random key from its
input key and the step (``fold_in(key, step)``) or keep the key in the saved
pytree, so that a resumed loop draws what an uninterrupted one would.

Atomicity: a checkpoint is written into a temporary folder, flushed to disk and
renamed to ``step_<n>``; the previous checkpoint is deleted only after that, so
a process killed mid-write leaves the previous one usable. Leaves are stored
with ``flax.serialization`` (msgpack) under their tree path (``.params['w']``)
with their dtype; typed PRNG keys as their key data. A restore matches leaves by
path, so a reordered state restores correctly and a renamed field fails loudly.

An unreadable snapshot (corrupt or truncated bytes) is set aside as
``unreadable-step_<n>`` and the loop continues from the newest readable older one,
saying so. With none readable, ``resume=true`` stops with a ``UserError`` naming the
file; ``resume=auto`` says in one warning that the loop starts over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from bnn_bench.errors import UserError

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


# SIGTERM: SLURM's preemption; SIGINT: Ctrl-C. Both stop a run the same way.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Session:
    """A run's checkpoints: one ``Checkpointer`` per loop name under ``root``, and the
    stop request of a signal.

    As a context manager it catches ``signals`` (SIGTERM, SIGINT, and submitit's preemption
    signal where submitit handles it): while a loop runs, the signal asks it to save
    at its next chunk end and stop; outside a loop the run stops at once. The previous
    handlers are restored on exit. Signals are only caught in the main thread.

    Args:
      root: the folder that holds one sub-folder per loop; None: no checkpoints, only
        the stop request (``stop_on_signals``).
      every: a loop saves every this many chunks and when it ends; 0 saves only on
        a stop request.
      resume: the run's ``resume``: True refuses to start a loop over when its
        snapshots are all unreadable (``Checkpointer.restore``).
    """

    def __init__(
        self,
        root: str | Path | None,
        every: int = 0,
        signals: tuple[int, ...] = STOP_SIGNALS,
        resume: bool | str = "auto",
    ):
        self.root = None if root is None else Path(root)
        self.every = int(every)
        self.resume = resume
        self.signals = signals
        self.signum: int | None = None  # the signal that asked the run to stop
        self.running = 0  # loops between their restore and their final save
        self._previous: dict[int, Any] = {}
        self._names: set[str] = set()

    def loop(self, name: str) -> Checkpointer:
        """The checkpointer of the loop called ``name`` (``<root>/<name>``). Each name
        is handed out once per run: two loops never share a folder."""
        if name in self._names:
            raise ValueError(f"a loop named {name!r} already ran in this run; name it apart.")
        self._names.add(name)
        directory = None if self.root is None else self.root / name
        return Checkpointer(directory, every=self.every, session=self, resume=self.resume)

    def __enter__(self) -> Session:
        self.signum, self.running = None, 0
        if threading.current_thread() is threading.main_thread():
            for s in _extra_signals(self.signals):
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _on_signal(self, signum, frame):
        del frame
        if self.running == 0:  # no loop running, nothing to save: requeue or stop at once
            self.chain_and_raise(signum, None, None)
        log.warning(
            "%s received: saving a checkpoint at the end of this chunk, then stopping.",
            signal.Signals(signum).name,
        )
        self.signum = signum

    def chain_and_raise(self, signum: int, step: int | None, path: Path | None) -> None:
        """After saving: hand over to a handler that was there before (submitit's requeue
        on its USR2 signal), else raise ``Preempted``."""
        previous = self._previous.get(signum)
        if callable(previous) and signum not in STOP_SIGNALS:
            previous(signum, None)  # submitit: requeue the job and exit
        raise Preempted(signum, step, path)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within: ``signals`` (and submitit's preemption signal) stop the job at once with
    ``Preempted``; a run's ``Session`` inside takes over while it is open, so that a
    running loop first saves. For the parts of a job around the run (data loading,
    writing the config)."""
    with Session(None, signals=signals):
        yield


def _extra_signals(signals: tuple[int, ...]) -> tuple[int, ...]:
    """``signals`` plus submitit's preemption signal when a submitit job handles it."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    usr = getattr(signal, f"SIG{name}", None)
    if usr is not None and usr not in signals and callable(signal.getsignal(usr)):
        return (*signals, usr)
    return signals


class Checkpointer:
    """Periodic, atomic checkpoints of one loop's pytree in ``directory``.

    Args:
      directory: where ``step_<n>/`` folders go; None disables saving (restore
        finds nothing), e.g. outside a run.
      every: save every this many ``maybe_save`` calls (chunks) and when the loop
        ends; 0 saves only on a stop request.
      keep: complete checkpoints kept (>= 1; the newest are kept).
      session: the run's session, whose stop request ``maybe_save`` obeys; None:
        no signal handling.
      resume: True: ``restore`` raises when snapshots exist and none is readable;
        otherwise it warns and the loop starts over.
    """

    def __init__(
        self,
        directory: str | Path | None,
        every: int = 0,
        keep: int = 1,
        session: Session | None = None,
        resume: bool | str = "auto",
    ):
        self.directory = None if directory is None else Path(directory)
        self.every, self.keep = int(every), max(1, int(keep))
        self.session = session
        self.resume = resume
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
        or None when there is none. Marks the loop as running (SIGTERM then waits for
        ``maybe_save``).

        Unreadable snapshots newer than the one restored are set aside
        (``unreadable-step_<n>``: a later save must not be pruned in favour of them), with
        a warning naming the file. With snapshots but none readable, ``resume=True``
        raises and anything else warns that the loop starts over.

        Raises:
          UserError: the state belongs to another configuration (another shape, dtype
            or field), or, with ``resume=True``, no snapshot is readable.
        """
        if self.session is not None and not self._open:
            self.session.running += 1
        self._open = True
        unreadable: list[tuple[Path, str]] = []  # newest first
        for step in reversed(self.steps()):
            path = self.directory / f"step_{step:09d}" / STATE_FILE
            try:
                tree = _load(path, template)
            except _Unreadable as e:
                unreadable.append((path, str(e)))
                continue
            if unreadable:
                log.warning(
                    "checkpoint %s is unreadable (%s); resuming %s from the older %s instead.",
                    *(*unreadable[0], self.directory.name, path),
                )
                self._set_aside(unreadable)
            log.info("resuming %s from step %d", self.directory.name, step)
            return step, tree
        if not unreadable:
            return None
        (newest, why), older = unreadable[0], len(unreadable) - 1
        also = f", and so {'are' if older > 1 else 'is'} the {older} older one(s)" if older else ""
        if self.resume is True:
            raise UserError(
                f"resume=true, but checkpoint {newest} is unreadable ({why}){also}: nothing "
                f"to continue from. Start over with resume=false (it clears the run folder)."
            )
        log.warning(
            "checkpoint %s is unreadable (%s)%s; %s starts over from step 0.",
            *(newest, why, also, self.directory.name),
        )
        self._set_aside(unreadable)
        return None

    def _set_aside(self, unreadable: list[tuple[Path, str]]) -> None:
        """Renames each unreadable ``step_<n>`` folder to ``unreadable-step_<n>``."""
        for path, _ in unreadable:
            folder = path.parent
            aside = folder.with_name(f"unreadable-{folder.name}")
            shutil.rmtree(aside, ignore_errors=True)  # one set aside before gives way
            os.replace(folder, aside)

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
        signum = self.session.signum if self.session is not None else None
        path = None
        if signum is not None or (self.every and (final or self._chunks % self.every == 0)):
            path = self.save(step, tree)
        if final and self._open:
            self._open = False
            if self.session is not None:
                self.session.running -= 1
        if signum is not None:
            self.session.chain_and_raise(signum, step, path)


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
    """``{tree path: array}`` as msgpack; arrays keep their dtype, keys their key data."""
    stored = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        stored[jax.tree_util.keystr(path)] = np.asarray(
            jax.random.key_data(leaf) if _is_key(leaf) else leaf
        )
    return serialization.msgpack_serialize(stored)


class _Unreadable(ValueError):
    """A snapshot's file cannot be read or decoded."""


def _load(path: Path, template: Any) -> Any:
    """The pytree of ``template``'s structure whose leaves are the arrays stored under the
    same tree paths. A missing or extra path, another shape or another dtype is refused:
    the checkpoint belongs to another configuration.

    Raises:
      _Unreadable: the file cannot be read, or its bytes are not a saved state.
      UserError: it is a saved state, of another configuration.
    """
    try:
        stored = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - corrupt bytes raise ValueError, TypeError, ...
        raise _Unreadable(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from e
    if not (
        isinstance(stored, dict)
        and stored
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in stored.items())
    ):
        raise _Unreadable("its bytes decode to no saved state")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(p) for p, _ in leaves]
    fix = "Start a new run folder (or resume=false)."
    if set(names) != set(stored):
        missing, extra = sorted(set(names) - set(stored)), sorted(set(stored) - set(names))
        raise UserError(
            f"checkpoint {path} does not match this run's state (missing {missing[:5]}, "
            f"unexpected {extra[:5]}): it belongs to a different configuration. {fix}"
        )
    return jax.tree.unflatten(
        treedef,
        [_leaf(path, n, stored[n], like, fix) for n, (_, like) in zip(names, leaves, strict=True)],
    )


def _leaf(path: Path, name: str, value: Any, like: Any, fix: str) -> Any:
    """The stored ``value`` as a leaf like ``like``, or a UserError naming ``name``."""
    value = np.asarray(value)
    if _is_key(like):
        return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
    if value.shape != np.shape(like):
        raise UserError(
            f"checkpoint {path}: {name} has shape {value.shape}, this run's state "
            f"{np.shape(like)}: a different configuration. {fix}"
        )
    if not isinstance(like, jax.Array | np.ndarray):  # a Python scalar
        return type(like)(value.item())
    if value.dtype != like.dtype:
        raise UserError(
            f"checkpoint {path}: {name} is {value.dtype}, this run's state {like.dtype}: "
            f"a different configuration. {fix}"
        )
    return jnp.asarray(value)
