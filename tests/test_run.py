"""End to end through the CLI (in process, as ``bnn-bench``): a complete run folder, and
one clear error for bad input."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tests.conftest import TINY

pytestmark = pytest.mark.e2e


def test_synthetic_run_writes_a_complete_run_folder(tmp_path, run_cli):
    proc = run_cli(f"hydra.run.dir={tmp_path / 'run'}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test/acc", "test/nll", "test/brier", "test/ece", "val/acc", "model/params"):
        assert math.isfinite(metrics[key]), key
    assert metrics["test/acc"] > 0.5  # 10 classes: chance is 0.1
    assert 0.0 <= metrics["test/ece"] <= 1.0 and metrics["test/members"] == 1
    assert len(metrics["curves"]["test"]["reliability"]["count"]) == 15
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert cfg["dataset"]["_target_"] == "bnn_bench.data.SyntheticDataset" and cfg["seed"] == 0
    assert (run / "plots" / "reliability.png").stat().st_size > 1000
    log = (run / "run.log").read_text()
    assert "parameters" in log and "Acc (soft vote)" in log


def test_same_seed_same_metrics(tmp_path, run_cli):
    a = run_cli(f"hydra.run.dir={tmp_path / 'a' / 'run'}", *TINY, "trainer.epochs=1")
    b = run_cli(f"hydra.run.dir={tmp_path / 'b' / 'run'}", *TINY, "trainer.epochs=1")
    assert a.returncode == b.returncode == 0
    ma = json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "run" / "metrics.json").read_text())
    assert {k: v for k, v in ma.items() if k.startswith("test/")} == {
        k: v for k, v in mb.items() if k.startswith("test/")
    }


BAD_INPUT = {
    "unknown dataset": (
        ["dataset=imagenet"],
        ["Could not find 'dataset/imagenet'", "fashion_mnist"],
    ),
    "unknown model": (["model=resnet"], ["Could not find 'model/resnet'", "mobilenet"]),
    "unknown method": (["method=nuts"], ["Could not find 'method/nuts'", "map"]),
    "misspelt key": (["trainer.learnig_rate=0.1"], ["learnig_rate"]),
    "missing data_dir": (
        ["dataset=cifar10", "dataset.data_dir=/nonexistent/cifar", "dataset.download=false"],
        ["dataset.data_dir=/nonexistent/cifar does not exist", "cifar-10-python.tar.gz"],
    ),
    "resize the model cannot take": (
        [*(o for o in TINY if not o.startswith("model")), "model=cnn", "dataset.resize=[6,6]"],
        ["model cnn cannot take synthetic inputs of shape (6, 6, 1)", "dataset.resize"],
    ),
    "bad optimizer": (
        [*TINY, "trainer/optimizer=adagrad"],
        ["Could not find 'trainer/optimizer/adagrad'", "adamw"],
    ),
    "trainer keys for a sampler": (
        [*(o for o in TINY if not o.startswith("method")), "method=sgld"],
        ["method=sgld does not train a network", "Did you mean method.epochs=4?"],
    ),
}


@pytest.mark.contract  # refused before any work
@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_clear_error_and_no_metrics(tmp_path, run_cli, case):
    overrides, expected = BAD_INPUT[case]
    proc = run_cli(f"hydra.run.dir={tmp_path / 'run'}", *overrides)
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("metrics.json"))
