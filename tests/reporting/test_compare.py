"""bnn-bench-compare on run folders made by tiny real runs (one multirun of 4 jobs), with
and without --reference."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from bnn_bench.reporting.compare import compare
from bnn_bench.reporting.runs import find_runs
from tests.conftest import CLI, TINY, cli_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """trainer.epochs in {1, 2} x seed in {0, 1}: four finished runs in one sweep folder."""
    root = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run(
        [
            *CLI,
            "-m",
            *[o for o in TINY if not o.startswith("trainer.epochs")],
            "trainer.epochs=1,2",
            "seed=0,1",
            f"hydra.sweep.dir={root}",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _job(root, epochs, seed):
    """The folder of the sweep's job ``trainer.epochs=<epochs> seed=<seed>`` (a job's folder
    is named by its overrides)."""
    (folder,) = [
        m.parent.parent
        for m in root.glob("*/.hydra/overrides.yaml")
        if {f"trainer.epochs={epochs}", f"seed={seed}"} <= set(yaml.safe_load(m.read_text()))
    ]
    return folder


def _runs_by_hand(root):
    """{epochs: [metrics of each seed]} straight from the files, without compare.py."""
    out: dict[str, list[dict]] = {}
    for m in sorted(root.glob("*/metrics.json")):
        overrides = yaml.safe_load((m.parent / ".hydra" / "overrides.yaml").read_text())
        epochs = next(o.split("=")[1] for o in overrides if o.startswith("trainer.epochs="))
        out.setdefault(epochs, []).append(json.loads(m.read_text()))
    return out


def test_table_numbers_are_mean_and_std_of_the_runs(sweep, tmp_path):
    by_hand = _runs_by_hand(sweep)
    assert {k: len(v) for k, v in by_hand.items()} == {"1": 2, "2": 2}
    table, out = compare([sweep], out=tmp_path / "cmp")

    rows = list(csv.DictReader((out / "comparison.csv").read_text().splitlines()))
    assert [r["trainer.epochs"] for r in rows] == ["1", "2"]  # grouped by the differing key
    assert "seed" not in rows[0]  # seeds are aggregated over, not grouped by
    for row in rows:
        runs = by_hand[row["trainer.epochs"]]
        assert int(row["runs"]) == 2 and sorted(row["seeds"].split()) == ["0", "1"]
        for metric in ("test/acc", "test/nll", "test/ece", "val/acc", "time/fit"):
            values = np.array([r[metric] for r in runs])
            assert float(row[f"{metric}/mean"]) == pytest.approx(values.mean(), rel=1e-12)
            assert float(row[f"{metric}/std"]) == pytest.approx(values.std(ddof=1), rel=1e-12)
    # seeds differ, so there is a spread to report
    assert float(rows[0]["test/nll/std"]) > 0

    # the printed table shows the same numbers, rounded
    runs = by_hand["2"]
    acc = np.array([r["test/acc"] for r in runs])
    assert f"| 2 | 2 | {acc.mean():.4f} ± {acc.std(ddof=1):.4f} |" in table
    assert (out / "comparison.md").read_text().strip().endswith(table.splitlines()[-1])
    for name in ("acc_vs_ece.png", "nll.png", "reliability.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_prints_the_table_and_fails_clearly_without_runs(sweep, tmp_path):
    cmd = [sys.executable, "-m", "bnn_bench.reporting.compare"]
    proc = subprocess.run(
        [*cmd, str(sweep), "--out", str(tmp_path / "c"), "--no-plots", "--metrics", "test/*"],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| trainer.epochs | n | test/acc | test/acc_hard |" in proc.stdout
    assert (tmp_path / "c" / "comparison.csv").is_file()
    assert not (tmp_path / "c" / "nll.png").exists()

    proc = subprocess.run(
        [*cmd, str(tmp_path / "empty")], env=cli_env(), capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no metrics.json" in proc.stderr


def test_single_runs_in_several_folders_group_by_what_differs(sweep, tmp_path):
    # two folders given separately; grouping by an explicit key works the same
    dirs = [_job(sweep, 1, 0), _job(sweep, 1, 1)]
    table, out = compare(dirs, out=tmp_path / "two", by=["seed"], plots=False)
    rows = list(csv.DictReader((out / "comparison.csv").read_text().splitlines()))
    assert [r["runs"] for r in rows] == ["1", "1"] and rows[0]["test/acc/std"] == ""
    assert "2 runs in 2 groups by seed" in table


def test_reference_adds_agreement_and_total_variation_of_each_run(sweep, tmp_path):
    ref = _job(sweep, 1, 0)
    ref_test = np.load(ref / "predictive" / "test.npy")
    table, out = compare([sweep], out=tmp_path / "ref", plots=False, reference=ref)
    by_epochs: dict[str, list] = {}
    for m in sorted(sweep.glob("*/metrics.json")):
        overrides = yaml.safe_load((m.parent / ".hydra" / "overrides.yaml").read_text())
        epochs = next(o.split("=")[1] for o in overrides if o.startswith("trainer.epochs="))
        p = np.load(m.parent / "predictive" / "test.npy")
        agree = np.mean(p.argmax(-1) == ref_test.argmax(-1))
        tv = np.mean(0.5 * np.abs(p.astype(np.float64) - ref_test).sum(-1))
        by_epochs.setdefault(epochs, []).append((agree, tv))
    rows = list(csv.DictReader((out / "comparison.csv").read_text().splitlines()))
    for row in rows:
        agree, tv = np.array(by_epochs[row["trainer.epochs"]]).T
        assert float(row["test/agreement/mean"]) == pytest.approx(agree.mean(), rel=1e-12)
        assert float(row["test/total_variation/mean"]) == pytest.approx(tv.mean(), rel=1e-12)
        assert float(row["val/total_variation/mean"]) > 0
    # rows[0] (epochs=1) holds the reference itself; rows[1] (epochs=2) differs from it
    assert 0 < float(rows[1]["test/total_variation/mean"]) < 1
    assert "test/agreement | test/total_variation |" in table.splitlines()[2]


def test_reference_on_the_command_line_itself_and_other_data(sweep, tmp_path):
    cmd = [sys.executable, "-m", "bnn_bench.reporting.compare"]
    run0 = _job(sweep, 1, 0)
    proc = subprocess.run(
        [*cmd, str(run0), "--reference", str(run0), "--out", str(tmp_path / "c"), "--no-plots"],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = csv.DictReader((tmp_path / "c" / "comparison.csv").read_text().splitlines())
    assert float(row["test/agreement/mean"]) == 1.0
    assert float(row["test/total_variation/mean"]) == 0.0

    # a reference whose test labels differ (another subset or split) is refused
    other = tmp_path / "other"
    shutil.copytree(run0, other)
    prints_path = other / "predictive" / "fingerprints.json"
    prints = json.loads(prints_path.read_text())
    prints["sets"]["test"]["labels_sha256"] = "0" * 64
    prints_path.write_text(json.dumps(prints))
    proc = subprocess.run(
        [*cmd, str(run0), "--reference", str(other), "--no-plots", "--out", str(tmp_path / "d")],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "evaluation set test differs" in proc.stderr and "different labels" in proc.stderr


def test_reference_ignores_the_runs_own_eval_reference_when_grouping(sweep, tmp_path):
    """A run made with eval.reference=<another run> (e.g. HMC seed 1 against seed 0) groups
    with the runs of its config under --reference, whose columns replace its own; without
    --reference its own agreement is against another reference, so it stays apart."""
    runs = tmp_path / "runs"
    for seed in (0, 1):  # trainer.epochs=1
        shutil.copytree(_job(sweep, 1, seed), runs / str(seed))
    overrides = runs / "1" / ".hydra" / "overrides.yaml"
    listed = yaml.safe_load(overrides.read_text())
    overrides.write_text(yaml.safe_dump([*listed, f"eval.reference={_job(sweep, 2, 0)}"]))

    table, out = compare([runs], out=tmp_path / "with", plots=False, reference=_job(sweep, 1, 0))
    (row,) = csv.DictReader((out / "comparison.csv").read_text().splitlines())
    assert row["runs"] == "2" and "eval.reference" not in row
    assert "2 runs in 1 groups" in table

    table, out = compare([runs], out=tmp_path / "without", plots=False)
    rows = list(csv.DictReader((out / "comparison.csv").read_text().splitlines()))
    assert [r["runs"] for r in rows] == ["1", "1"]
    assert rows[0]["eval.reference"] == "default"


def test_format_drops_the_spread_of_a_count_the_seeds_do_not_change():
    from bnn_bench.reporting.compare_table import _fmt

    assert _fmt(150000.0, 0.0) == "150000"  # e.g. cost/grad_evals of two seeds
    assert _fmt(280.0, float("nan")) == "280"
    assert _fmt(0.8311, 0.0) == "0.8311 ± 0.0000"  # a measured value keeps its spread
    assert _fmt(7.0, 1.0) == "7.0000 ± 1.0000"  # a spread keeps the digits


def test_wall_time_is_the_sum_of_the_stage_times(sweep, tmp_path):
    # time/total: derived per run from run.py's four stage times, then averaged per group
    table, out = compare(
        [sweep], out=tmp_path / "t", metrics=["test/acc", "time/total"], plots=False
    )
    totals: dict[str, list[float]] = {}
    for m in sorted(sweep.glob("*/metrics.json")):
        metrics = json.loads(m.read_text())
        assert "time/total" not in metrics  # run.py writes the stages only
        overrides = yaml.safe_load((m.parent / ".hydra" / "overrides.yaml").read_text())
        epochs = next(o.split("=")[1] for o in overrides if o.startswith("trainer.epochs="))
        stages = [metrics[k] for k in ("time/setup", "time/fit", "time/predict", "time/evaluate")]
        assert all(s > 0 for s in stages)
        totals.setdefault(epochs, []).append(sum(stages))
    rows = list(csv.DictReader((out / "comparison.csv").read_text().splitlines()))
    for row in rows:
        expected = np.mean(totals[row["trainer.epochs"]])
        assert float(row["time/total/mean"]) == pytest.approx(expected, rel=1e-12)
    assert "| trainer.epochs | n | test/acc | time/total |" in table

    # a run that reports its own time/total keeps it; one without every stage gets none
    run = _job(sweep, 1, 0)
    own = tmp_path / "own" / "0"
    shutil.copytree(run, own)
    metrics = json.loads((own / "metrics.json").read_text())
    metrics["time/total"] = 123.0
    (own / "metrics.json").write_text(json.dumps(metrics))
    partial = tmp_path / "own" / "1"
    shutil.copytree(run, partial)
    del metrics["time/total"], metrics["time/evaluate"]
    (partial / "metrics.json").write_text(json.dumps(metrics))
    # (each folder alone: two copies of one job together count once)
    (own_run,), (partial_run,) = find_runs([own]), find_runs([partial])
    assert own_run.metrics["time/total"] == 123.0
    assert "time/total" not in partial_run.metrics


# --- what compare leaves out, on hand-made run folders ----------------------------------------


def _run_folder(path, overrides, metrics=None, error=None):
    """A run folder as bnn-bench leaves it: .hydra/ (overrides, config), and metrics.json
    (finished) or error.txt (failed) or neither (unfinished)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"seed": 0, "method": {"name": "default"}}
    for o in overrides:
        key, value = o.split("=")
        config = {**config, "method": {"name": value}} if key == "method" else config
        config = {**config, "seed": int(value)} if key == "seed" else config
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps({**metrics, "curves": {}}, indent=1))
    if error is not None:
        (path / "error.txt").write_text(error)
    return path


def test_compare_lists_what_it_left_out_and_counts_each_job_once(tmp_path):
    root = tmp_path / "sweep"
    a0 = _run_folder(root / "a0", ["method=a", "seed=0"], {"test/acc": 0.8, "test/nll": 0.5})
    _run_folder(root / "a1", ["method=a", "seed=1"], {"test/acc": 0.6, "test/nll": 0.7})
    # a corrupted metrics.json, as `head -c 300 RUN/metrics.json > m && mv m RUN/metrics.json`
    bad = _run_folder(root / "a2", ["method=a", "seed=2"], {f"x/{i}": i for i in range(100)})
    (bad / "metrics.json").write_bytes((bad / "metrics.json").read_bytes()[:300])
    _run_folder(root / "a3", ["method=a", "seed=3"])  # interrupted: no metrics.json
    _run_folder(root / "b0", ["method=b", "seed=0"], error="method.x=3 is refused; use 2.\n")
    crash = "ValueError: boom\n\nTraceback (most recent call last):\n  ...\n"
    _run_folder(root / "b1", ["method=b", "seed=1"], error=crash)
    # an older folder of job a0 (a re-launch whose job numbers shifted): counted once
    old = root / "old" / "7"
    shutil.copytree(a0, old)
    os.utime(old / "metrics.json", ns=(1, 1))
    (old / "metrics.json").write_text(json.dumps({"test/acc": 0.1, "test/nll": 9.0}))
    os.utime(old / "metrics.json", ns=(1, 1))

    report, out = compare([root], out=tmp_path / "cmp", metrics=["test/acc"], plots=False)
    rows = {r["method"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert (rows["a"]["runs"], rows["a"]["jobs"]) == ("2", "4")  # a0 (once), a1 of a0..a3
    assert float(rows["a"]["test/acc/mean"]) == pytest.approx(0.7)  # not the older 0.1
    assert (rows["b"]["runs"], rows["b"]["jobs"]) == ("0", "2")
    assert "| a | 2 of 4 | 0.7000 ± 0.1414 |" in report
    assert "| b | 0 of 2 | – |" in report
    assert (
        "status: 2 of 6 jobs finished, 1 failed, 1 crashed, 1 unfinished, 1 unreadable, "
        "1 duplicate folder(s) left out." in report
    )
    left = report.split("left out of the table:")[1]
    for state, path, reason in [
        ("unreadable", bad / "metrics.json", "JSONDecodeError"),
        ("unfinished", root / "a3", "no metrics.json"),
        ("failed", root / "b0" / "error.txt", "method.x=3 is refused; use 2."),
        ("crashed", root / "b1" / "error.txt", "ValueError: boom"),
        ("duplicate", old, f"the same job as {a0} (newer)"),
    ]:
        (line,) = [x for x in left.splitlines() if x.split()[1:2] == [str(path)]]
        assert line.split()[0] == state and reason in line, line
    assert (out / "comparison.md").read_text().strip() == report.strip()


def test_status_gives_finished_failed_and_missing_jobs_of_a_sweep(tmp_path, capsys):
    from bnn_bench.reporting.compare import main
    from bnn_bench.sweep import job_dir

    sweep = tmp_path / "sweep"
    jobs = [[f"method={m}", f"seed={s}"] for m in ("a", "b") for s in (0, 1)]
    _run_folder(sweep / job_dir(jobs[0]), jobs[0], {"test/acc": 0.8})
    _run_folder(sweep / job_dir(jobs[1]), jobs[1], error="refused\n")
    _run_folder(sweep / job_dir(jobs[2]), jobs[2], {"test/acc": 0.7})
    # the sweep's multirun.yaml, as Hydra's basic sweeper writes it: jobs[3] never started
    hydra = {
        "sweep": {"dir": str(sweep), "subdir": "${bnn_bench.job_dir:${hydra.overrides.task}}"},
        "sweeper": {
            "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
            "params": None,
        },
        "overrides": {"task": ["method=a,b", "seed=0,1"]},
    }
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra, "seed": 0}))

    assert main(["--status", str(sweep)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "status: 2 of 4 jobs finished, 1 failed, 1 missing."
    states = {line.split()[1]: line.split()[0] for line in printed[1:]}
    assert states == {
        str(sweep / job_dir(jobs[0])): "finished",
        str(sweep / job_dir(jobs[1]) / "error.txt"): "failed",
        str(sweep / job_dir(jobs[2])): "finished",
        str(sweep / job_dir(jobs[3])): "missing",
    }
    assert not (sweep / "comparison").exists()  # --status writes nothing


def test_old_metric_keys_are_read_under_their_new_names_and_named(tmp_path, monkeypatch):
    from bnn_bench.reporting import runs

    # two renames, as the renaming pass adds them: one key, and one name in every set
    monkeypatch.setitem(runs.OLD_KEYS, "cost/old_evals", "cost/grad_evals")
    monkeypatch.setitem(runs.OLD_KEYS, "*/accuracy", "*/acc")
    root = tmp_path / "runs"
    old = _run_folder(
        root / "old", ["seed=0"], {"test/accuracy": 0.6, "val/accuracy": 0.5, "cost/old_evals": 7}
    )
    _run_folder(root / "new", ["seed=1"], {"test/acc": 0.8, "val/acc": 0.7, "cost/grad_evals": 7})
    # a file holding both names keeps the new one's value
    both = _run_folder(root / "both", ["seed=2"], {"test/acc": 0.9, "test/accuracy": 0.1})

    (run,) = [r for r in find_runs([root]) if r.path == old.resolve()]
    assert run.metrics == {"test/acc": 0.6, "val/acc": 0.5, "cost/grad_evals": 7}
    assert run.renamed == {
        "test/accuracy": "test/acc",
        "val/accuracy": "val/acc",
        "cost/old_evals": "cost/grad_evals",
    }
    report, out = compare([root], out=tmp_path / "cmp", metrics=["test/acc"], plots=False)
    assert "| all | 3 | 0.7667 ± 0.1528 |" in report  # 0.6, 0.8, 0.9
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert float(rows[0]["val/acc/mean"]) == pytest.approx(0.6)  # (0.5 + 0.7) / 2
    assert "val/accuracy/mean" not in rows[0]
    head, *again = report.split("old metric names translated in 2 metrics.json file(s):\n")[1:]
    named = {line.split()[0]: line.split(None, 1)[1] for line in head.strip().splitlines()}
    assert named == {
        str(old.resolve() / "metrics.json"): "test/accuracy -> test/acc, val/accuracy -> "
        "val/acc, cost/old_evals -> cost/grad_evals",
        str(both.resolve() / "metrics.json"): "test/accuracy -> test/acc",
    }
    assert not again
