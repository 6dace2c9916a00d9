"""The evaluation through ``run``: OOD and shifted sets in the plan, metrics.json keys,
plots, the results table; a mismatched OOD set stops before training."""

from __future__ import annotations

import json
import logging
import re

import pytest

from bnn_bench.config import build
from bnn_bench.errors import UserError
from bnn_bench.evaluation.sets import evaluation_sets
from bnn_bench.methods.point.map import MAP
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg, documentation
from tests.evaluation.test_plots import ALWAYS

pytestmark = pytest.mark.e2e

OOD = [
    "dataset@eval.ood_dataset=synthetic",
    "eval.ood_dataset.data_seed=1",
    "eval.ood_dataset.test_size=128",
    "eval.ood_dataset.train_size=8",
]
SHIFT = [
    "eval.shift=[rotate,invert]",
    "eval.shift_levels.rotate=[90]",
    "eval.shift_levels.invert=[1.0]",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(*TINY, *OOD, *SHIFT)
    logging.getLogger("bnn_bench").setLevel(logging.INFO)
    return out, run(cfg, out)


def test_metrics_json_has_every_set_and_group(tiny_run):
    out, metrics = tiny_run
    saved = json.loads((out / "metrics.json").read_text())
    for name in ("test", "val", "shift/rotate/90", "shift/invert/1"):
        for key in (
            "acc",
            "acc_hard",
            "nll",
            "brier",
            "entropy",
            "mutual_info",
            "expected_entropy",
            "ece",
            "aece",
            "mce",
            "aurc",
            "augrc",
            "cov_at_5risk",
            "risk_at_80cov",
            "certainty",
            "uncertain",
            "members",
        ):
            assert f"{name}/{key}" in saved, f"{name}/{key}"
    assert "ood/acc" not in saved and "ood/entropy" in saved
    for score in ("msp", "entropy"):
        assert 0.5 < saved[f"ood/auroc_{score}"] <= 1.0  # the other synthetic classes stand out
    assert saved["ood/auroc_mi"] is None  # one member: no mutual information
    assert saved["test/acc"] > 0.5 and saved["test/members"] == 1
    # inverting the images hurts a model trained on upright, positive images
    assert saved["shift/invert/1/acc"] < saved["test/acc"]
    assert saved["model/params"] > 0 and saved["model/flops"] > 2 * saved["model/params"] * 0.9
    curves = saved["curves"]
    assert set(curves) == {"test", "val", "shift"}
    assert curves["shift"]["rotate"]["level"] == [0.0, 90.0]
    assert curves["shift"]["rotate"]["acc"][0] == saved["test/acc"]
    assert len(curves["test"]["reliability"]["count"]) == 15
    assert metrics["test/acc"] == saved["test/acc"]


def test_plots_written(tiny_run):
    out, _ = tiny_run
    written = {p.stem for p in (out / "plots").glob("*.png")}
    assert written == ALWAYS  # a point estimate: none of the member plots


def test_table_lists_every_group():
    from bnn_bench.evaluation.tables import metrics_table

    metrics = {
        "test/acc": 0.9,
        "test/ece": 0.05,
        "test/aurc": 0.01,
        "ood/auroc_msp": 0.8,
        "ood/auroc_mi": float("nan"),
        "shift/rotate/90/acc": 0.2,
        "model/params": 1234.0,
    }
    table = metrics_table(metrics)
    for text in (
        "Classification",
        "Calibration",
        "Selective classification",
        "OOD detection",
        "Shift",
        "Complexity",
        "90.00%",
        "80.00%",
        "n/a",
        "1,234",
    ):
        assert text in table, text


def test_ood_shape_mismatch_stops_before_training(tmp_path, monkeypatch):
    def no_fit(*args, **kwargs):
        raise AssertionError("fit must not start")

    monkeypatch.setattr(MAP, "fit", no_fit)
    cfg = compose_cfg(*TINY, *OOD, "eval.ood_dataset.shape=[32,32,3]")
    with pytest.raises(UserError, match=r"shape \(32, 32, 3\).*resize"):
        run(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_resized_ood_set_takes_the_data_shape():
    cfg = compose_cfg(
        *TINY, *OOD, "eval.ood_dataset.shape=[32,32,1]", "eval.ood_dataset.resize=[28,28]"
    )
    sets = evaluation_sets(build(cfg.dataset, "dataset").load(), build(cfg.eval, "eval"))
    assert sets["ood"].x.shape == (128, 28, 28, 1) and sets["ood"].x.dtype == "uint8"


def test_readme_documents_every_metric_key(tiny_run):
    out, _ = tiny_run
    saved = json.loads((out / "metrics.json").read_text())
    # keys of other topics (e.g. a sampler's) may be documented in their own sections
    documented = set(re.findall(r"`([a-z0-9_<>/]+)`", documentation()))
    for key in saved:
        if key == "curves":
            continue
        generic = re.sub(r"^shift/[a-z_]+/[0-9.]+/", "<set>/", key)
        generic = re.sub(r"^(test|val|ood)/(?!auroc|aupr|fpr95)", "<set>/", generic)
        if generic.startswith("ood/"):
            generic = re.sub(r"^ood/(auroc|aupr|fpr95)_[a-z]+$", r"ood/\1_<score>", generic)
        assert generic in documented, f"{key} ({generic}) is not documented in the README or docs/"
    for curve in saved["curves"]["test"]:
        assert curve in documented, curve
