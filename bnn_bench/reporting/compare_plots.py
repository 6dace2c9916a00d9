"""The comparison's plots: accuracy vs ECE, NLL per group, pooled reliability curves; for
regression runs NLL per group and calibration curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bnn_bench.reporting.compare_table import Group


def plot_comparison(out: Path, groups: Sequence[Group], split: str = "test") -> list[Path]:
    """Accuracy vs ECE, NLL per group (error bars: std over seeds), reliability curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, g in enumerate(groups):
        (acc, acc_sd), (ece, ece_sd) = g.mean_std(f"{split}/acc"), g.mean_std(f"{split}/ece")
        if math.isnan(acc) or math.isnan(ece):
            continue
        ax.errorbar(
            ece,
            acc,
            xerr=np.nan_to_num(ece_sd),
            yerr=np.nan_to_num(acc_sd),
            fmt="o",
            capsize=3,
            color=colors[i % len(colors)],
            label=g.name,
        )
        ax.scatter(
            g.values(f"{split}/ece"),
            g.values(f"{split}/acc"),
            s=8,
            alpha=0.4,
            color=colors[i % len(colors)],
        )
    ax.set_xlabel(f"{split} ECE (lower is better)")
    ax.set_ylabel(f"{split} accuracy (higher is better)")
    ax.set_title("accuracy vs calibration (mean ± std over seeds)")
    ax.legend(fontsize="small")
    paths.append(_save(fig, out / "acc_vs_ece.png"))

    paths.append(_nll_bars(out, groups, split, colors))

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    for i, g in enumerate(groups):
        curve = _mean_reliability(g, split)
        if curve is not None:
            ax.plot(*curve, "o-", ms=3, color=colors[i % len(colors)], label=g.name)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability ({split}; bins pooled over seeds)")
    ax.legend(fontsize="small")
    paths.append(_save(fig, out / "reliability.png"))
    return paths


def _nll_bars(out: Path, groups: Sequence[Group], split: str, colors) -> Path:
    """NLL per group: bar the mean, error bar the std, dots the runs."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) + 2), 4))
    stats = [g.mean_std(f"{split}/nll") for g in groups]
    ax.bar(
        range(len(groups)),
        [m for m, _ in stats],
        yerr=[np.nan_to_num(s) for _, s in stats],
        capsize=4,
        color=[colors[i % len(colors)] for i in range(len(groups))],
    )
    for i, g in enumerate(groups):
        ax.scatter(
            np.full(len(g.values(f"{split}/nll")), i),
            g.values(f"{split}/nll"),
            color="black",
            s=8,
            zorder=3,
        )
    ax.set_xticks(
        range(len(groups)), [g.name for g in groups], rotation=20, ha="right", fontsize="small"
    )
    ax.set_ylabel(f"{split} NLL (lower is better)")
    ax.set_title("NLL per group (bar: mean, error bar: std, dots: runs)")
    return _save(fig, out / "nll.png")


def plot_regression_comparison(
    out: Path, groups: Sequence[Group], split: str = "test"
) -> list[Path]:
    """Regression runs: NLL per group, and the calibration curves (observed against expected
    coverage of the central intervals), averaged over each group's runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = [_nll_bars(out, groups, split, colors)]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", label="calibrated")
    for i, g in enumerate(groups):
        curves = [r.curves.get(split, {}).get("calibration") for r in g.runs]
        curves = [c for c in curves if c]
        if curves:
            observed = np.mean([np.asarray(c["observed"], float) for c in curves], 0)
            ax.plot(
                curves[0]["expected"],
                observed,
                "o-",
                ms=3,
                color=colors[i % len(colors)],
                label=g.name,
            )
    ax.set_xlabel("expected coverage (level of the central interval)")
    ax.set_ylabel("observed coverage")
    ax.set_title(f"calibration ({split}; mean over each group's runs)")
    ax.legend(fontsize="small")
    paths.append(_save(fig, out / "calibration.png"))
    return paths


def _mean_reliability(g: Group, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Confidence and accuracy per bin, pooling the runs' bins weighted by their counts."""
    bins = [r.curves.get(split, {}).get("reliability") for r in g.runs]
    bins = [b for b in bins if b]
    if not bins:
        return None
    count = np.sum([np.asarray(b["count"], float) for b in bins], 0)
    conf = np.sum([np.asarray(b["confidence"], float) * np.asarray(b["count"]) for b in bins], 0)
    acc = np.sum([np.asarray(b["accuracy"], float) * np.asarray(b["count"]) for b in bins], 0)
    filled = count > 0
    return conf[filled] / count[filled], acc[filled] / count[filled]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
