"""Shared fixtures: composing the real config tree, tiny synthetic overrides, the CLI in
process or in a real one, and the test tiers.

Every test belongs to exactly one tier (``pytest -m <tier>``):

- ``unit``: one function or class on tiny inputs, seconds at most;
- ``contract``: what every config choice, method or command must honour, on shapes or
  composed configs, without training;
- ``e2e``: a run, a sweep or a real CLI process, as a user meets it;
- ``statistical``: a method's numbers against a closed form or a reference, on many draws;
- ``long``: longer than CI allows (not run by default).

The inner loop is ``pytest -m "unit or contract"``; CI runs all but ``long``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# One persistent JAX compilation cache for the test session, its xdist workers and the CLI
# processes they start (set before JAX is imported, inherited by ``cli_env``): the tests
# compile the same tiny programs over and over (each run jits its own closures), and on the
# CPU XLA's compile is most of a tiny run. A user's own setting wins.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "bnn-bench-tests-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402 - after the cache's environment
import pytest
from absl import logging as absl_logging
from hydra import compose, initialize_config_dir

from bnn_bench.overrides import trainers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def documentation_files() -> list[Path]:
    """The README and every page of the docs site (``docs/``), in a fixed order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def documentation() -> str:
    """The text of the README and every docs page, one after another."""
    return "\n".join(p.read_text() for p in documentation_files())


# A tiny, fast, learnable run: 28x28 synthetic data, an MLP, a few steps.
TINY = [
    "dataset=synthetic",
    "method=map",
    "dataset.train_size=512",
    "dataset.test_size=256",
    "dataset.contrast=0.5",
    "model=mlp",
    "model.hidden=[32]",
    "trainer.epochs=4",
    "trainer.batch_size=64",
    "eval.batch_size=128",
]


def trains(method: str) -> bool:
    """Whether ``method=<method>`` reads the trainer group (``overrides.trainers``)."""
    return method in trainers(CONF)


def tiny(method: str) -> list[str]:
    """TINY for ``method``: without the trainer keys when the method does not train."""
    keep = [o for o in TINY if trains(method) or not o.startswith("trainer.")]
    return [o if o != "method=map" else f"method={method}" for o in keep]


def compose_cfg(*overrides: str):
    """The config the CLI would compose for these overrides (without the hydra node)."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def config_choices(group: str) -> list[str]:
    """The choices of a config group: one YAML per choice."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def cli_env() -> dict[str, str]:
    """Environment for subprocess runs of the CLI: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


CLI = [sys.executable, "-m", "bnn_bench.cli"]
TIERS = ("unit", "contract", "e2e", "statistical", "long")
HEAVY = ("e2e", "statistical", "long")

RunCli = Callable[..., subprocess.CompletedProcess]


def run_cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """``bnn-bench <args>`` in this process (``cli.entry``, Hydra's own parsing and
    compose), with its exit status (``sys.exit``'s code; 0 if it returns) and what it
    printed. No interpreter and JAX start-up, no recompiles of a model already compiled."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from bnn_bench.cli import entry

    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, root = sys.argv, logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sys.argv = ["bnn-bench", *args]
    # Hydra's logging set-up closes every handler there is (logging.config), absl's too,
    # which closes its stream unless it is sys.stderr: pytest's capture, when redirected
    absl_close = absl_logging.PythonHandler.close
    absl_logging.PythonHandler.close = logging.StreamHandler.close
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                entry()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        absl_logging.PythonHandler.close = absl_close
        # the job's logging (run.log, the console) ends with it, as the process would
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # the job is over, as its process would be
    return subprocess.CompletedProcess(["bnn-bench", *args], code, out.getvalue(), err.getvalue())


def run_cli_process(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``bnn-bench <args>`` in a process of its own: for exit codes set by the process
    itself (signals), folder locks held across processes, environment and umask."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env=cli_env() if env is None else env,
        timeout=timeout,
    )


@pytest.fixture
def run_cli(tmp_path, monkeypatch) -> RunCli:
    """Runs ``bnn-bench <args>`` and returns a ``CompletedProcess`` (``returncode``,
    ``stdout``, ``stderr``): in this process by default, in a real one with
    ``process=True`` (then ``timeout`` and ``env`` apply). In process, the TFDS folder is
    the test's own, and the working directory too (Hydra writes ``outputs/`` there)."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.chdir(tmp_path)

    def run(
        *args: str, process: bool = False, timeout: float = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        if process:
            return run_cli_process(*args, timeout=timeout, env=env)
        return run_cli_in_process(*args)

    return run


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def plan_only(tmp_path, monkeypatch):
    """Dry runs without the XLA memory estimate, which compiles the model (seconds each;
    tests/test_cli.py covers it), with a TFDS folder of their own, not the user's, and
    offline: a download's hosts count as reachable (tests/data covers the probe)."""
    from bnn_bench import dry_run
    from bnn_bench.data import sources

    monkeypatch.setattr(dry_run, "_compiled_bytes", lambda *args: 0)
    monkeypatch.setattr(sources, "probe_download", lambda *args: None)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))


def _tier(item: pytest.Item) -> str | None:
    """The tier closest to the test: its own, else its class's, else its module's.
    ``slow`` (the marker before the tiers) keeps a test out of the fast tiers: in a
    ``unit`` or ``contract`` module it makes the test ``e2e``."""
    tier = next((m.name for m in item.iter_markers() if m.name in TIERS), None)  # closest first
    if tier in ("unit", "contract") and item.get_closest_marker("slow") is not None:
        return "e2e"
    return tier


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects, so that it sees the one tier
def pytest_collection_modifyitems(config, items):
    """Gives each test exactly one tier, the closest (a test's own marker overrides its
    module's ``pytestmark``), and fails a test with none. Heavy tiers go first (stable
    otherwise): pytest-xdist hands out tests in collection order, so a minutes-long test
    collected last would run alone after the rest."""
    tiers = {item.nodeid: _tier(item) for item in items}
    for node in {n for item in items for n in item.listchain()[:-1]}:
        node.own_markers[:] = [m for m in node.own_markers if m.name not in TIERS]
    for item in items:
        tier = tiers[item.nodeid]
        item.own_markers[:] = [m for m in item.own_markers if m.name not in TIERS]
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
    items.sort(key=lambda item: tiers[item.nodeid] not in HEAVY)


def pytest_runtest_setup(item):
    """A test with no tier fails (CI runs every tier but ``long``, so it is seen)."""
    if _tier(item) is None:
        pytest.fail(
            f"{item.nodeid} has no tier: mark it, or its module (pytestmark), with one of "
            f"{', '.join(TIERS)} (tests/conftest.py)"
        )
