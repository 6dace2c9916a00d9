"""Real Fashion-MNIST (Debian's dataset-fashion-mnist), through the CLI. Slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_run import bnn_bench

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(not FASHION.exists(),
                                reason="apt-get install dataset-fashion-mnist")


@pytest.mark.slow
@needs_data
def test_map_cnn_on_fashion_mnist(tmp_path):
    proc = bnn_bench(tmp_path, "method=map", "model=cnn", "dataset=fashion_mnist",
                     "eval.plots=false", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/members"] == 1
    # Measured 0.8446 with the default trainer (adam 1e-3, 5 epochs); the 90%
    # bar is NOT met by these defaults (see the README). This guards against regressions.
    assert metrics["test/acc"] >= 0.83, metrics["test/acc"]
    assert metrics["test/ece"] < 0.05
    log = (tmp_path / "run" / "run.log").read_text()
    assert "system copy /usr/share/datasets/fashion-mnist" in log
