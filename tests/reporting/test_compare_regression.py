"""bnn-bench-compare on regression runs (hand-made run folders): the UCI columns as
mean ± se over the splits, and W2 against a reference from the runs' predictive files."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from bnn_bench.evaluation.settings import EvalSettings
from bnn_bench.evaluation.tasks import Regression
from bnn_bench.reporting.compare import compare, main
from tests.evaluation.test_regression_run import _data, _summaries
from tests.reporting.test_compare import _run_folder

pytestmark = pytest.mark.unit


def _regression_metrics(rmse, nll):
    return {"test/rmse": rmse, "test/nll": nll, "test/crps": rmse / 2, "test/coverage_95": 0.9}


def test_regression_runs_show_mean_and_standard_error(tmp_path, capsys):
    root = tmp_path / "sweep"
    values = {"map": [(3.0, 2.0), (5.0, 2.5), (4.0, 3.0)], "laplace": [(3.5, 1.5), (3.7, 1.9)]}
    for method, runs in values.items():
        for split, (rmse, nll) in enumerate(runs):
            _run_folder(
                root / f"{method}{split}",
                [f"method={method}", f"seed={split}"],
                _regression_metrics(rmse, nll),
            )
    report, out = compare([root], out=tmp_path / "cmp")
    assert "mean ± se" in report.splitlines()[0]
    assert "| method | n | test/rmse | test/nll | test/crps | test/coverage_95 |" in report
    # map: rmse 3, 5, 4 -> mean 4, std 1, se 1/√3
    se = 1 / math.sqrt(3)
    assert f"| map | 3 | 4.0000 ± {se:.4f} | 2.5000 ± {0.5 / math.sqrt(3):.4f} |" in report
    rows = {r["method"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert float(rows["map"]["test/rmse/std"]) == pytest.approx(1.0)  # the CSV keeps the std
    assert {p.name for p in out.glob("*.png")} == {"nll.png", "calibration.png"}
    assert main([str(root), "--out", str(tmp_path / "cmp2"), "--no-plots"]) == 0
    assert "| map | 3 | 4.0000 ±" in capsys.readouterr().out


def test_reference_adds_w2_of_each_regression_run(tmp_path):
    data = _data()
    sets = {"test": data.test}
    task = Regression(data, EvalSettings())
    prints = task.fingerprints(sets)
    root = tmp_path / "sweep"
    for seed in (0, 1):
        folder = root / f"run{seed}"
        _run_folder(folder, ["method=x", f"seed={seed}"], _regression_metrics(1.0, 1.0))
        task.write_predictive(folder, _summaries(task, data, sets, seed=seed), prints)
    ref = root / "run0"  # the reference is one of the runs: its own W2 is 0
    report, out = compare([root], out=tmp_path / "cmp", reference=ref, plots=False)
    assert "test/w2" in report and "W2, mean and std errors against" in report
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert float(rows[0]["test/w2/mean"]) > 0 and np.isfinite(float(rows[0]["test/w2/std"]))
