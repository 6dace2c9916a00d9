"""scripts/check_regression.py: the comparison of stored and new metrics (no runs)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cr():
    spec = importlib.util.spec_from_file_location(
        "check_regression", ROOT / "scripts" / "check_regression.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STORED = {
    "test/acc": 0.8851,
    "test/nll": 0.3185568990980146,
    "test/risk": 0.0013,
    "cost/grad_evals": 3150.0,
    "time/fit": 26.2,
    "cost/compile_s": 8.5,
    "laplace/time_prior": 3.0,
    "sampler/burn_in_steps_per_s": 218.3,
    "curves/test/reliability/count": [1.0, 2.0, 3.0],
}


def test_identical_metrics_have_no_difference(cr):
    assert cr.compare(STORED, dict(STORED)) == []


def test_machine_dependent_keys_are_ignored(cr):
    now = {**STORED, "time/fit": 99.0, "cost/compile_s": 1.0, "laplace/time_prior": 7.0}
    now["sampler/burn_in_steps_per_s"] = 1.0
    now["cost/peak_device_mib"] = 512.0  # appears on a GPU only
    assert cr.compare(STORED, now) == []


def test_a_key_added_since_recording_counts_only_at_its_recorded_value(cr):
    assert cr.compare(STORED, {**STORED, "data/augment": 0.0}) == []
    rows = cr.compare(STORED, {**STORED, "data/augment": 1.0})
    assert rows == [{"key": "data/augment", "kind": "new", "stored": None, "now": 1.0}]


def test_last_bit_of_a_float_is_a_difference(cr):
    nudged = 0.3185568990980146 + 2**-54  # the next float up
    assert nudged != STORED["test/nll"]
    rows = cr.compare(STORED, {**STORED, "test/nll": nudged})
    assert rows == [
        {"key": "test/nll", "kind": "changed", "stored": STORED["test/nll"], "now": nudged}
    ]
    table = cr.format_rows(rows)
    assert "test/nll" in table and repr(nudged) in table and "changed" in table


def test_a_changed_curve_entry_is_a_difference(cr):
    now = {**STORED, "curves/test/reliability/count": [1.0, 2.0, 4.0]}
    rows = cr.compare(STORED, now)
    assert [(r["key"], r["kind"]) for r in rows] == [("curves/test/reliability/count", "changed")]
    assert "1 entries differ" in cr.format_rows(rows)


def test_missing_new_and_probably_renamed_keys(cr):
    now = dict(STORED)
    now["test/member_std"] = now.pop("test/risk")  # same value, new name
    del now["test/acc"]
    now["test/acc_extra"] = 0.5
    rows = {r["key"]: r["kind"] for r in cr.compare(STORED, now)}
    assert rows == {
        "test/risk -> test/member_std": "renamed?",
        "test/acc": "missing",
        "test/acc_extra": "new",
    }


def test_a_declared_rename_compares_under_the_new_name(cr):
    now = dict(STORED)
    now["test/member_std"] = now.pop("test/risk")
    assert cr.compare(STORED, now, renames={"test/risk": "test/member_std"}) == []
    now["test/member_std"] = 0.0014
    rows = cr.compare(STORED, now, renames={"test/risk": "test/member_std"})
    assert [(r["key"], r["kind"], r["stored"]) for r in rows] == [
        ("test/member_std", "changed", 0.0013)
    ]


def test_nan_matches_nan_and_none_differs_from_a_number(cr):
    assert cr.compare({"x": float("nan")}, {"x": float("nan")}) == []
    assert [r["kind"] for r in cr.compare({"x": None}, {"x": 0.0})] == ["changed"]


def test_flatten_reads_metrics_json_curves(cr):
    payload = {"test/acc": 0.5, "curves": {"test": {"reliability": {"count": [1, 2]}}}}
    assert cr.flatten(payload) == {"test/acc": 0.5, "curves/test/reliability/count": [1, 2]}


def test_no_run_mode_exits_nonzero_on_a_difference(cr, tmp_path, capsys):
    """The command's compare path end to end, on a fabricated run folder and store."""
    store, out = tmp_path / "store", tmp_path / "runs"
    (out / "map").mkdir(parents=True)
    (store).mkdir()
    record = {"case": "map", "overrides": ["method=map"], "environment": {}, "metrics": STORED}
    (store / "map.json").write_text(json.dumps(record))
    run = {k: v for k, v in STORED.items() if not k.startswith("curves/")}
    run["curves"] = {"test": {"reliability": {"count": [1.0, 2.0, 3.0]}}}
    (out / "map" / "metrics.json").write_text(json.dumps(run))
    args = ["--cases", "map", "--out", str(out), "--no-run", "--store", str(store)]
    assert cr.main(args) == 0
    run["test/acc"] = 0.8852
    (out / "map" / "metrics.json").write_text(json.dumps(run))
    assert cr.main(args) == 1
    assert "test/acc" in capsys.readouterr().out


def test_every_case_has_a_stored_reference(cr):
    paths = sorted((ROOT / "scripts" / "regression").glob("*.json"))
    assert {p.stem for p in paths} == set(cr.CASES)
    for path in paths:
        record = json.loads(path.read_text())
        assert record["case"] == path.stem and isinstance(record["overrides"], list)
        assert "test/acc" in record["metrics"]
        assert not any(cr.ignored(k) for k in record["metrics"])


def test_metric_renames_are_declared_for_compare_too(cr):
    """A metric key renamed in the code is compared under its new name here (``RENAMES``)
    and read under it by bnn-bench-compare (``OLD_KEYS``): the two tables agree."""
    from bnn_bench.reporting.runs import OLD_KEYS

    assert OLD_KEYS  # issue 22's renames (temperature/T, laplace/time_map, hmc/warmup_*)
    assert {k: cr.RENAMES.get(k) for k in OLD_KEYS} == OLD_KEYS


def test_a_renamed_metric_compares_under_its_new_name(cr):
    stored = {"temperature/T": 1.5, "test/acc": 0.9}
    now = {"temperature/logit_temperature": 1.5, "test/acc": 0.9}
    assert cr.compare(stored, now, cr.RENAMES) == []
    assert cr.compare(stored, {**now, "temperature/logit_temperature": 1.6}, cr.RENAMES) != []
