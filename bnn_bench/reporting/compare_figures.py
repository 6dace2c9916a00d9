"""``bnn-bench-compare --plot``: the pictures of a comparison, for any set of runs.

- ``cost_quality.png``: every group's test NLL and ECE (rows) against its cost, gradient
  evaluations and wall time (columns, log scale); the Pareto front (no other group is
  both cheaper and better) is drawn as a line through its groups, which are filled.
- ``fidelity.png``: agreement with the reference run (``--reference``, or the runs' own
  ``eval.reference``) against the same two costs; the reference itself (e.g. HMC) is the
  star at agreement 1 and its own cost.
- ``reliability_grid.png``: one reliability diagram per group, side by side (bins pooled
  over seeds, weighted by their counts), each with its ECE.

A group without a number (a post-hoc run loaded with ``init_from`` counts no gradients)
is left out of that panel and named below it, never drawn at 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bnn_bench.reporting.compare_plots import _save
from bnn_bench.reporting.compare_table import Group

COSTS = (("cost/grad_evals", "gradient evaluations"), ("time/total", "wall time (s)"))
QUALITIES = (("test/nll", "test NLL"), ("test/ece", "test ECE"))


def pareto_front(costs: Sequence[float], losses: Sequence[float]) -> list[int]:
    """The indices of the points no other point dominates (cost and loss both lower or
    equal, one strictly lower), in order of cost. NaNs are never on the front."""
    points = [
        (c, q, i) for i, (c, q) in enumerate(zip(costs, losses, strict=True)) if _finite(c, q)
    ]
    front, best = [], math.inf
    for _cost, q, i in sorted(points):
        if q < best:
            front.append(i)
            best = q
    return front


def _finite(*values: float) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _label(g: Group) -> str:
    """A group's short name: the values of its label (``swag``, ``cnn laplace``), a
    group choice left at its default named by what the run chose (``sgld``)."""
    choices = _choices(g.runs[0].path) if g.runs else {}
    words = [choices.get(k, "") if v == "default" else v for k, v in g.label.items()]
    return " ".join(w for w in words if w and w != "None") or g.name


def _choices(folder: Path) -> dict[str, str]:
    """The group choices a run made (``.hydra/hydra.yaml``: ``runtime.choices``)."""
    import yaml

    try:
        hydra = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
        return {k: str(v) for k, v in hydra["hydra"]["runtime"]["choices"].items()}
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return {}


def _log_x(ax) -> None:
    """A log cost axis labelled at 1, 2 and 5 times each power of ten, in plain numbers
    (the default labels of a narrow range overlap)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelsize=7)
    ax.margins(x=0.25, y=0.08)


def _annotate(ax, points: list[tuple[float, float, str]]) -> None:
    """Labels the points, stacking the labels of points that (nearly) coincide."""
    ys = [y for _, y, _ in points]
    span = (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    for x, y, text in points:
        near = sum(
            abs(math.log10(x / px)) < 0.12 and abs(y - py) < 0.04 * span for px, py in placed
        )
        placed.append((x, y))
        ax.annotate(text, (x, y), fontsize=7, xytext=(5, 3 - 9 * near), textcoords="offset points")


def _panel(ax, groups: Sequence[Group], cost: str, quality: str, colors: list[str]) -> list[str]:
    """One cost-against-quality panel; returns the groups it had to leave out."""
    xs = [g.mean_std(cost)[0] for g in groups]
    ys = [g.mean_std(quality)[0] for g in groups]
    front = set(pareto_front(xs, ys))
    left_out, shown = [], []
    for i, (g, x, y) in enumerate(zip(groups, xs, ys, strict=True)):
        if not _finite(x, y) or x <= 0:
            left_out.append(_label(g))
            continue
        color = colors[i % len(colors)]
        ax.scatter(x, y, s=46, color=color if i in front else "white", edgecolors=color, zorder=3)
        shown.append((x, y, _label(g)))
    if shown:
        _annotate(ax, shown)
    line = sorted((xs[i], ys[i]) for i in front if xs[i] > 0)
    if line:
        ax.step(*zip(*line, strict=True), where="post", color="0.5", lw=1, zorder=1)
    _log_x(ax)
    return left_out


def plot_cost_quality(out: Path, groups: Sequence[Group]) -> Path:
    """Test NLL and ECE against gradient evaluations and wall time, Pareto fronts marked."""
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), squeeze=False)
    for row, (quality, q_name) in enumerate(QUALITIES):
        for col, (cost, c_name) in enumerate(COSTS):
            ax = axes[row][col]
            left_out = _panel(ax, groups, cost, quality, colors)
            ax.set_xlabel(
                c_name + (f"\nnot shown (no number): {', '.join(left_out)}" if left_out else "")
            )
            ax.set_ylabel(f"{q_name} (lower is better)")
            ax.grid(alpha=0.3)
    fig.suptitle(
        "cost against quality (mean over seeds); filled, joined: the Pareto front", fontsize=11
    )
    return _save(fig, out / "cost_quality.png")


def _reference_point(reference: str | Path | None) -> dict[str, float]:
    """The reference run's own costs, from its metrics.json (``time/total`` summed as the
    comparison does); empty without a reference."""
    if reference is None:
        return {}
    metrics = json.loads((Path(reference) / "metrics.json").read_text())
    stages = [metrics.get(f"time/{s}") for s in ("setup", "fit", "predict", "evaluate")]
    if "time/total" not in metrics and _finite(*stages):
        metrics["time/total"] = sum(stages)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def plot_fidelity(
    out: Path, groups: Sequence[Group], reference: str | Path | None = None
) -> Path | None:
    """Test agreement with the reference against gradient evaluations and wall time; None
    when no run has ``test/agreement``."""
    import matplotlib.pyplot as plt

    if not any(g.values("test/agreement").size for g in groups):
        return None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ref = _reference_point(reference)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), squeeze=False)
    for col, (cost, c_name) in enumerate(COSTS):
        ax = axes[0][col]
        shown = []
        for i, g in enumerate(groups):
            x, y = g.mean_std(cost)[0], g.mean_std("test/agreement")[0]
            if _finite(x, y) and x > 0:
                ax.scatter(x, y, s=46, color=colors[i % len(colors)], zorder=3)
                shown.append((x, y, _label(g)))
        if shown:
            _annotate(ax, shown)
        if _finite(ref.get(cost, math.nan)) and ref[cost] > 0:
            ax.scatter(ref[cost], 1.0, marker="*", s=220, color="black", zorder=4)
            ax.annotate(
                "reference",
                (ref[cost], 1.0),
                fontsize=8,
                xytext=(6, -10),
                textcoords="offset points",
            )
        _log_x(ax)
        ax.set_xlabel(c_name)
        ax.set_ylabel("test agreement with the reference (higher is better)")
        ax.grid(alpha=0.3)
    name = Path(reference).name if reference is not None else "the runs' eval.reference"
    fig.suptitle(f"fidelity against cost (reference: {name}, the star)", fontsize=11)
    return _save(fig, out / "fidelity.png")


def plot_reliability_grid(out: Path, groups: Sequence[Group], split: str = "test") -> Path:
    """One reliability diagram per group, side by side, bins pooled over seeds."""
    import matplotlib.pyplot as plt

    cols = min(4, max(1, len(groups)))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax, g in zip(axes.flat, groups, strict=False):
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        pooled = _pooled_bins(g, split)
        if pooled is not None:
            centre, width, conf, acc = pooled
            ax.bar(centre, acc, width=width, alpha=0.75, edgecolor="black", lw=0.4)
            ax.bar(
                centre,
                np.abs(conf - acc),
                bottom=np.minimum(conf, acc),
                width=width,
                facecolor="none",
                edgecolor="red",
                hatch="//",
                lw=0.6,
            )
        ece = g.mean_std(f"{split}/ece")[0]
        ax.set_title(f"{_label(g)}\nECE {ece:.4f}" if _finite(ece) else _label(g), fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    fig.supxlabel("confidence", fontsize=9)
    fig.supylabel("accuracy (hatched red: the gap to the bin's mean confidence)", fontsize=9)
    return _save(fig, out / "reliability_grid.png")


def _pooled_bins(g: Group, split: str):
    """(bin centres, widths, mean confidence, accuracy) of the non-empty bins, pooled
    over the group's runs weighted by their counts; None without reliability curves."""
    bins = [r.curves.get(split, {}).get("reliability") for r in g.runs]
    bins = [b for b in bins if b and b.get("edges")]
    if not bins:
        return None
    edges = np.asarray(bins[0]["edges"], float)
    count = np.sum([np.asarray(b["count"], float) for b in bins], 0)
    conf = np.sum([np.asarray(b["confidence"], float) * b["count"] for b in bins], 0)
    acc = np.sum([np.asarray(b["accuracy"], float) * b["count"] for b in bins], 0)
    full = count > 0
    centre, width = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
    return centre[full], width[full], conf[full] / count[full], acc[full] / count[full]


def _common_reference(groups: Sequence[Group]) -> str | None:
    """The runs' own ``eval.reference`` when they all name the same one."""
    named = {r.overrides.get("eval.reference") for g in groups for r in g.runs}
    return named.pop() if len(named) == 1 else None


def plot_figures(
    out: Path, groups: Sequence[Group], reference: str | Path | None = None
) -> list[Path]:
    """``--plot``: the cost-quality, fidelity (when there is a reference) and reliability
    figures of ``groups``, written into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    paths = [plot_cost_quality(out, groups)]
    fidelity = plot_fidelity(out, groups, reference or _common_reference(groups))
    if fidelity is not None:
        paths.append(fidelity)
    return [*paths, plot_reliability_grid(out, groups)]
