"""Shared fixtures: composing the real config tree, tiny synthetic overrides."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

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
    """Whether ``method=<method>`` composes the trainer group (its YAML's defaults do)."""
    return "/trainer@" in (CONF / "method" / f"{method}.yaml").read_text()


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


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable otherwise): pytest-xdist hands out tests in collection
    order, so a minutes-long test collected last would run alone after the rest."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
