"""Real Fashion-MNIST (Debian's dataset-fashion-mnist): as a data_dir, and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(
    not FASHION.exists(), reason="apt-get install dataset-fashion-mnist"
)


@needs_data
def test_map_mlp_on_fashion_mnist(tmp_path, run_cli):
    """The default experiment's network on the real data, as a user runs it."""
    proc = run_cli(
        f"hydra.run.dir={tmp_path / 'run'}",
        "method=map",
        "dataset=fashion_mnist",
        "eval.plots=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # Measured with the default MLP and trainer (seed 0): acc 0.8948, ECE 0.0427
    # (docs/results/2026-12-03-one-table.md).
    assert metrics["test/acc"] >= 0.885, metrics["test/acc"]
    assert metrics["test/ece"] < 0.06
    log = (tmp_path / "run" / "run.log").read_text()
    assert "system copy /usr/share/datasets/fashion-mnist: train 54000, val 6000, test 10000" in log


@pytest.mark.long  # ~5 min on 2 cores: outside CI's budget; pytest -m long
@needs_data
def test_map_cnn_on_fashion_mnist(tmp_path, run_cli):
    proc = run_cli(
        f"hydra.run.dir={tmp_path / 'run'}",
        "method=map",
        "model=cnn",
        "dataset=fashion_mnist",
        "eval.plots=false",
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/members"] == 1
    # The bar. Measured with the default trainer (adam 3e-3, cosine, 20 epochs):
    # 0.9078 (seed 0); the 15-epoch runs that gave 0.9032 and 0.9002 were too close to it.
    assert metrics["test/acc"] >= 0.90, metrics["test/acc"]
    assert metrics["test/ece"] < 0.05
    log = (tmp_path / "run" / "run.log").read_text()
    assert "system copy /usr/share/datasets/fashion-mnist" in log


@needs_data
def test_real_fashion_mnist_from_data_dir_matches_the_system_copy():
    """The same files read as a user's data_dir and as the system copy: the real
    60k/10k split, every class present, and identical arrays."""
    import numpy as np

    from bnn_bench.data import preset

    mine = preset("fashion_mnist", data_dir=str(FASHION.parent), val_fraction=0.0)
    system = preset("fashion_mnist", source="system", val_fraction=0.0)
    assert mine.source == f"local files in {FASHION.parent}"
    assert system.source == f"system copy {FASHION.parent}"
    assert (mine.train.size, mine.test.size) == (60_000, 10_000)
    assert np.bincount(np.asarray(mine.test.y)).tolist() == [1000] * 10
    np.testing.assert_array_equal(np.asarray(mine.train.x), np.asarray(system.train.x))
    assert mine.spec.class_names[9] == "Ankle boot"
