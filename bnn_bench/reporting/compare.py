"""``bnn-bench-compare DIR...``: one table and a few plots across finished runs.

Reads ``metrics.json`` of every run below the given folders (a multirun's sweep
folder, several single runs, or a mix), groups the runs by the overrides that
differ between them (``method``, ``dataset``, ...; read from each run's
``.hydra/overrides.yaml``), and reports each metric as mean ± std over the runs
of a group (the seeds). Works offline; W&B is not involved.

Outputs, in ``--out`` (default ``<first DIR>/comparison``):
  comparison.md   the table printed to the terminal (Markdown)
  comparison.csv  one row per group: the group's overrides, ``runs``, ``seeds``,
                  and ``<metric>/mean``, ``<metric>/std`` for every numeric metric
  acc_vs_ece.png, nll.png, reliability.png   comparison plots with error bars

The std is the sample standard deviation (ddof = 1); empty for a single run.

``--reference RUN`` scores every run's posterior predictive (``predictive/``)
against that finished run's (e.g. full-batch HMC) without re-running anything:
``<set>/agreement`` and ``<set>/total_variation`` for every labelled set the two
share (``bnn_bench.evaluation.fidelity``); they replace any such columns the
runs' own metrics.json hold, and the printed table shows the test set's. With
``--reference`` a run's own ``eval.reference`` override does not split the groups
(its columns are replaced); without it, it does (they hold other references' numbers).

Derived per run: ``time/total``, the run's wall time from the start of setup to the
end of evaluation (the sum of ``run.py``'s stage times ``time/setup``, ``time/fit``,
``time/predict``, ``time/evaluate``; without the interpreter's start and the writing
of plots and files), where the run has all four and no ``time/total`` of its own.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnn_bench.errors import UserError
from bnn_bench.evaluation import fidelity
from bnn_bench.reporting.loggers import NOT_IDENTITY, override_key, read_overrides

# The columns of the printed table unless --metrics says otherwise.
DEFAULT_METRICS = ("test/acc", "test/nll", "test/ece", "test/brier", "cost/grad_evals", "time/fit")
AGGREGATED = ("seed",)  # varied to measure spread, not to compare
FIDELITY_METRICS = ("test/agreement", "test/total_variation")  # shown with --reference
# Overrides that --reference makes irrelevant: a run's own eval.reference only adds the
# fidelity columns that --reference recomputes against one reference for every run.
REFERENCE_ONLY = ("eval.reference",)
# run.py's timed stages, in order; their sum is a run's wall time (time/total)
STAGES = ("time/setup", "time/fit", "time/predict", "time/evaluate")


@dataclass
class Run:
    """One finished run: its folder, overrides (``{key: value}``) and metrics.json."""

    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float]
    curves: dict = field(default_factory=dict)


@dataclass
class Group:
    """The runs that share every differing override but the seed."""

    label: dict[str, str]
    runs: list[Run]

    @property
    def name(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.label.items()) or "all runs"

    def values(self, metric: str) -> np.ndarray:
        return np.array(
            [
                r.metrics[metric]
                for r in self.runs
                if isinstance(r.metrics.get(metric), int | float)
            ],
            dtype=float,
        )

    def mean_std(self, metric: str) -> tuple[float, float]:
        v = self.values(metric)
        if v.size == 0:
            return math.nan, math.nan
        return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def find_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Every run folder with a metrics.json below ``dirs`` (sorted by path)."""
    runs, seen = [], set()
    for d in dirs:
        for path in sorted(Path(d).rglob("metrics.json")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            payload = json.loads(path.read_text())
            curves = payload.pop("curves", {})
            metrics = {k: v for k, v in payload.items() if isinstance(v, int | float)}
            if "time/total" not in metrics and all(k in metrics for k in STAGES):
                metrics["time/total"] = float(sum(metrics[k] for k in STAGES))
            overrides = {}
            for o in read_overrides(path.parent):
                key = override_key(o)
                if key.split(".")[0] not in NOT_IDENTITY:
                    overrides[key] = o.split("=", 1)[1] if "=" in o else ""
            runs.append(Run(path.parent, overrides, metrics, curves))
    return runs


def add_fidelity(runs: Sequence[Run], reference: str | Path) -> None:
    """Adds ``<set>/agreement`` and ``<set>/total_variation`` against the finished run
    ``reference`` to every run's metrics, from the runs' ``predictive/`` files.

    Raises:
      UserError: when a run or the reference lacks its predictive, or their data differ.
    """
    ref_prints, ref_probs = fidelity.read_predictive(reference, f"--reference {reference}")
    for r in runs:
        prints, probs = fidelity.read_predictive(r.path, f"run {r.path}")
        sets = fidelity.shared_sets(prints, ref_prints, f"run {r.path} against --reference")
        r.metrics.update(fidelity.fidelity_metrics(probs, ref_probs, sets))


def group_runs(
    runs: Sequence[Run], by: Sequence[str] | None = None
) -> tuple[list[str], list[Group]]:
    """Groups runs by ``by`` or, if None, by every override whose value differs
    between runs (a missing override counts as ``default``), the seed excepted.
    Returns the grouping keys and the groups in first-seen order."""
    if by is None:
        keys = sorted({k for r in runs for k in r.overrides})
        by = [
            k
            for k in keys
            if k not in AGGREGATED and len({r.overrides.get(k, "default") for r in runs}) > 1
        ]
    groups: dict[tuple, Group] = {}
    for r in runs:
        label = {k: r.overrides.get(k, "default") for k in by}
        groups.setdefault(tuple(label.items()), Group(label, [])).runs.append(r)
    return list(by), list(groups.values())


def pick_metrics(runs: Sequence[Run], patterns: Sequence[str]) -> list[str]:
    """The metrics matching the glob ``patterns`` that some run has, in pattern order."""
    names = sorted({k for r in runs for k in r.metrics})
    out: list[str] = []
    for p in patterns:
        out += [n for n in names if fnmatch.fnmatchcase(n, p) and n not in out]
    return out


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    integral = float(mean).is_integer() and (math.isnan(std) or std == 0)
    digits = 0 if integral or abs(mean) >= 1000 else 4
    s = f"{mean:.{digits}f}"
    # a count the seeds do not change (steps, gradient evaluations) needs no "± 0"
    return s if math.isnan(std) or (integral and std == 0) else f"{s} ± {std:.{digits}f}"


def markdown_table(by: Sequence[str], groups: Sequence[Group], metrics: Sequence[str]) -> str:
    """A Markdown table: one row per group, ``mean ± std`` per metric."""
    head = [*(by or ["runs"]), "n", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [*(g.label.values() if by else ["all"]), str(len(g.runs))]
        cells += [_fmt(*g.mean_std(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(
    path: Path, by: Sequence[str], groups: Sequence[Group], metrics: Sequence[str]
) -> None:
    """Full-precision means and stds; one row per group."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*by, "runs", "seeds", *(f"{m}/{s}" for m in metrics for s in ("mean", "std"))])
        for g in groups:
            seeds = " ".join(r.overrides.get("seed", "default") for r in g.runs)
            row: list = [*g.label.values(), len(g.runs), seeds]
            for m in metrics:
                row += ["" if math.isnan(x) else repr(x) for x in g.mean_std(m)]
            w.writerow(row)


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
    paths.append(_save(fig, out / "nll.png"))

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


def compare(
    dirs: Sequence[str | Path],
    out: str | Path | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    by: Sequence[str] | None = None,
    plots: bool = True,
    reference: str | Path | None = None,
) -> tuple[str, Path]:
    """Compares the runs below ``dirs``; returns the Markdown table and the output folder.

    ``reference``: a finished run's folder; adds agreement and total variation against
    its predictive (see ``add_fidelity``).
    """
    runs = find_runs(dirs)
    if not runs:
        raise FileNotFoundError(
            f"no metrics.json below {', '.join(map(str, dirs))}; "
            f"only finished runs can be compared."
        )
    if reference is not None:
        add_fidelity(runs, reference)
        metrics = [*metrics, *FIDELITY_METRICS]
        for r in runs:  # e.g. a second HMC seed run with eval.reference=<the first>
            for key in REFERENCE_ONLY:
                r.overrides.pop(key, None)
    out = Path(out) if out is not None else Path(dirs[0]) / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    keys, groups = group_runs(runs, by)
    shown = pick_metrics(runs, metrics)
    table = markdown_table(keys, groups, shown)
    header = (
        f"{len(runs)} runs in {len(groups)} groups"
        f"{' by ' + ', '.join(keys) if keys else ''}; mean ± std (ddof=1) over seeds."
        + (f" Agreement and total variation against {reference}." if reference else "")
    )
    (out / "comparison.md").write_text(header + "\n\n" + table + "\n")
    write_csv(out / "comparison.csv", keys, groups, pick_metrics(runs, ["*"]))
    if plots:
        plot_comparison(out, groups)
    return header + "\n\n" + table, out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bnn-bench-compare",
        description="Compare finished bnn-bench runs: mean ± std over seeds per group of "
        "differing overrides, as a table (Markdown, CSV) and plots.",
        epilog="example: bnn-bench-compare outputs/multirun/2026-11-23/10-00-00 "
        "--reference outputs/2026-11-22/09-00-00",
    )
    parser.add_argument("dirs", nargs="+", help="run or sweep folders (searched recursively)")
    parser.add_argument("--out", help="output folder (default: <first DIR>/comparison)")
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help="comma-separated metric names or globs for the printed table "
        "(the CSV has all); default: %(default)s",
    )
    parser.add_argument(
        "--by",
        help="comma-separated override keys to group by "
        "(default: every override that differs, except seed)",
    )
    parser.add_argument(
        "--reference",
        help="a finished run folder (e.g. method=hmc): add <set>/agreement and "
        "<set>/total_variation of every run's predictive against its predictive",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")
    args = parser.parse_args(argv)
    try:
        table, out = compare(
            args.dirs,
            args.out,
            args.metrics.split(","),
            args.by.split(",") if args.by else None,
            not args.no_plots,
            args.reference,
        )
    except (FileNotFoundError, UserError) as e:
        print(f"bnn-bench-compare: error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(
        f"\nwrote {out}/comparison.md, comparison.csv"
        f"{', acc_vs_ece.png, nll.png, reliability.png' if not args.no_plots else ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
