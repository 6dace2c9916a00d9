"""``bnn-bench-compare --plot`` on tiny fake run folders: the Pareto front against a
brute-force dominance check, and the three figures written for any set of runs."""

from __future__ import annotations

import itertools
import json

import matplotlib
import numpy as np
import pytest
import yaml

from bnn_bench.reporting.compare import compare, main
from bnn_bench.reporting.compare_figures import _panel, pareto_front
from bnn_bench.reporting.compare_table import group_runs
from bnn_bench.reporting.runs import survey

matplotlib.use("Agg")
pytestmark = pytest.mark.unit


def dominated(i: int, costs, losses) -> bool:
    """Whether another point is at least as good in both and better in one."""
    return any(
        costs[j] <= costs[i]
        and losses[j] <= losses[i]
        and (costs[j] < costs[i] or losses[j] < losses[i])
        for j in range(len(costs))
        if j != i
    )


@pytest.mark.parametrize("seed", range(5))
def test_the_pareto_front_is_the_undominated_points(seed):
    rng = np.random.default_rng(seed)
    costs, losses = rng.integers(1, 8, 12).astype(float), rng.random(12)
    front = pareto_front(list(costs), list(losses))
    expected = {i for i in range(12) if not dominated(i, costs, losses)}
    assert set(front) == expected
    assert [costs[i] for i in front] == sorted(costs[i] for i in front)  # in order of cost


def test_the_pareto_front_skips_missing_numbers():
    assert pareto_front([1.0, float("nan"), 3.0], [0.5, 0.1, 0.2]) == [0, 2]


def _run(path, overrides, metrics, bins=(0.55, 0.75, 0.95)):
    """A finished run folder: .hydra/ and metrics.json with a reliability curve."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"seed": int(next(o for o in overrides if o.startswith("seed=")).split("=")[1])}
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**config, "o": overrides}))
    reliability = {
        "count": [10, 20, 30],
        "confidence": list(bins),
        "accuracy": [b - 0.05 for b in bins],
        "edges": [0.4, 0.6, 0.8, 1.0],
    }
    curves = {"test": {"reliability": reliability}}
    (path / "metrics.json").write_text(json.dumps({**metrics, "curves": curves}))
    return path


METHODS = {  # method: (grad evals, time, NLL, ECE, agreement)
    "map": (100, 5.0, 0.40, 0.05, 0.90),
    "ensemble": (500, 25.0, 0.30, 0.02, 0.91),
    "sgld": (300, 30.0, 0.35, 0.01, 0.95),
    "swag": (200, 40.0, 0.45, 0.06, 0.90),  # dominated in NLL by map and sgld
}


@pytest.fixture
def runs(tmp_path):
    for (method, (g, t, nll, ece, agree)), seed in itertools.product(METHODS.items(), (0, 1)):
        metrics = {
            "test/acc": 0.9,
            "test/nll": nll + 0.01 * seed,
            "test/ece": ece,
            "cost/grad_evals": g,
            "time/total": t,
            "test/agreement": agree,
        }
        _run(tmp_path / "runs" / f"{method}{seed}", [f"method={method}", f"seed={seed}"], metrics)
    ref = _run(
        tmp_path / "hmc", ["method=hmc", "seed=0"], {"test/acc": 0.9, "cost/grad_evals": 1e5}
    )
    (ref / "metrics.json").write_text(
        json.dumps(
            {
                "cost/grad_evals": 1e5,
                **{f"time/{s}": 10.0 for s in ("setup", "fit", "predict", "evaluate")},
            }
        )
    )
    return tmp_path / "runs", ref


def _png(path):
    from matplotlib.image import imread

    assert path.is_file(), path
    image = imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 0  # not blank
    return image


def test_plot_writes_the_three_figures(runs, tmp_path):
    folder, ref = runs
    _, out = compare([folder], out=tmp_path / "cmp", plots=False, figures=True)
    for name in ("cost_quality.png", "fidelity.png", "reliability_grid.png"):
        _png(out / name)
    assert not (out / "acc_vs_ece.png").exists()  # --no-plots still leaves the old ones out


def test_no_agreement_no_fidelity_figure(tmp_path):
    for method in ("a", "b"):
        _run(
            tmp_path / "r" / method,
            [f"method={method}", "seed=0"],
            {"test/nll": 0.3, "test/ece": 0.1},
        )
    _, out = compare([tmp_path / "r"], out=tmp_path / "cmp", plots=False, figures=True)
    assert (out / "cost_quality.png").is_file() and (out / "reliability_grid.png").is_file()
    assert not (out / "fidelity.png").exists()


def test_the_panel_marks_the_front_and_names_what_it_left_out(runs, tmp_path):
    import matplotlib.pyplot as plt

    folder, _ = runs
    (folder / "map0" / "metrics.json").write_text(
        json.dumps({"test/nll": 0.4, "test/ece": 0.05, "curves": {}})  # no cost counted
    )
    (folder / "map1" / "metrics.json").write_text(
        json.dumps({"test/nll": 0.4, "test/ece": 0.05, "curves": {}})
    )
    _, groups = group_runs(survey([folder]).runs)
    fig, ax = plt.subplots()
    left_out = _panel(ax, groups, "cost/grad_evals", "test/nll", ["C0"])
    assert left_out == ["map"]
    filled = [c for c in ax.collections if c.get_facecolor()[0][:3].tolist() != [1.0, 1.0, 1.0]]
    # the front by NLL without map: sgld (300, 0.355) and ensemble (500, 0.305); swag is
    # cheaper than both (200) and so on the front too
    assert len(filled) == 3
    plt.close(fig)


def test_the_cli_takes_plot(runs, tmp_path, capsys):
    folder, ref = runs
    assert main([str(folder), "--plot", "--no-plots", "--out", str(tmp_path / "o")]) == 0
    wrote = capsys.readouterr().out.rsplit("wrote ", 1)[1]
    assert all(
        name in wrote for name in ("cost_quality.png", "reliability_grid.png", "fidelity.png")
    )
    _png(tmp_path / "o" / "reliability_grid.png")


def test_the_fidelity_figure_reads_the_reference_cost(runs, tmp_path):
    from bnn_bench.reporting.compare_figures import _reference_point, plot_fidelity

    folder, ref = runs
    point = _reference_point(ref)
    assert point["cost/grad_evals"] == 1e5 and point["time/total"] == 40.0  # summed stages
    _, groups = group_runs(survey([folder]).runs)
    _png(plot_fidelity(tmp_path, groups, ref))
