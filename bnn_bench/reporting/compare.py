"""``bnn-bench-compare DIR...``: one table and a few plots across finished runs.

Reads ``metrics.json`` of every run below the given folders (a multirun's sweep
folder, several single runs, or a mix), groups the runs by the overrides that
differ between them (``method``, ``dataset``, ...; read from each run's
``.hydra/overrides.yaml``), and reports each metric as mean ± std over the runs
of a group (the seeds, and a UCI dataset's ``dataset.split``). Works offline; W&B is not involved.

Outputs, in ``--out`` (default ``<first DIR>/comparison``):
  comparison.md   the table printed to the terminal (Markdown)
  comparison.csv  one row per group: the group's overrides, ``runs`` (finished), ``jobs``
                  (finished or not), ``seeds``,
                  and ``<metric>/mean``, ``<metric>/std`` for every numeric metric
  acc_vs_ece.png, nll.png, reliability.png   comparison plots with error bars
                  (regression runs: nll.png, calibration.png)
  with --plot: cost_quality.png (test NLL and ECE against gradient evaluations and wall
  time, Pareto front marked), fidelity.png (agreement with the reference against cost;
  with a reference) and reliability_grid.png (one reliability diagram per group)

The std is the sample standard deviation (ddof = 1); empty for a single run.

Regression runs (every run reports ``test/rmse``) show, unless ``--metrics`` says
otherwise, ``test/rmse``, ``test/nll``, ``test/crps`` and ``test/coverage_95`` as mean ±
standard error (std / √n, the UCI tables' convention over seeds and splits); with
``--reference``, ``test/w2``, ``test/mean_error`` and ``test/std_error``
(``bnn_bench.evaluation.regression_fidelity``).

``--reference RUN`` scores every run's posterior predictive (``predictive/``)
against that finished run's (e.g. full-batch HMC) without re-running anything:
``<set>/agreement`` and ``<set>/total_variation`` for every labelled set the two
share (``bnn_bench.evaluation.fidelity``); they replace any such columns the
runs' own metrics.json hold, and the printed table shows the test set's. With
``--reference`` a run's own ``eval.reference`` override does not split the groups
(its columns are replaced); without it, it does (they hold other references' numbers).

Nothing is dropped silently, and no configuration is counted twice. Every run folder
below the given folders (one with ``.hydra/``, ``metrics.json`` or ``error.txt``) is
finished (a readable metrics.json), failed (``error.txt``), crashed (``error.txt``
with a traceback), unfinished (neither: interrupted, killed, or still running) or
unreadable (a metrics.json or ``.hydra/`` file that does not parse); a job of the
sweep's last launch without a folder is missing. Two folders holding the same job (the
same resolved config, seed included; e.g. one left by an older launch) count once, the
newest. The table's ``n`` says ``n of m`` where a group has jobs without results, and
the output lists each folder left out with its file and the reason. ``--status``
prints every job's state and the counts, writes nothing, and exits 1 unless all
finished.

Derived per run: ``time/total``, the run's wall time from the start of setup to the
end of evaluation (the sum of ``run.py``'s stage times ``time/setup``, ``time/fit``,
``time/predict``, ``time/evaluate``; without the interpreter's start and the writing
of plots and files), where the run has all four and no ``time/total`` of its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bnn_bench.errors import UserError
from bnn_bench.evaluation import fidelity
from bnn_bench.evaluation import regression_fidelity as RF
from bnn_bench.reporting.compare_figures import plot_figures
from bnn_bench.reporting.compare_plots import plot_comparison, plot_regression_comparison
from bnn_bench.reporting.compare_table import (
    group_runs,
    markdown_table,
    pick_metrics,
    status_lines,
    status_summary,
    write_csv,
)
from bnn_bench.reporting.runs import Run, survey

# The columns of the printed table unless --metrics says otherwise.
DEFAULT_METRICS = ("test/acc", "test/nll", "test/ece", "test/brier", "cost/grad_evals", "time/fit")
FIDELITY_METRICS = ("test/agreement", "test/total_variation")  # shown with --reference
# Regression runs (every run has test/rmse): the UCI tables' columns, as mean ± se.
REGRESSION_METRICS = ("test/rmse", "test/nll", "test/crps", "test/coverage_95", "time/fit")
REGRESSION_FIDELITY = ("test/w2", "test/mean_error", "test/std_error")
# Overrides that --reference makes irrelevant: a run's own eval.reference only adds the
# fidelity columns that --reference recomputes against one reference for every run.
REFERENCE_ONLY = ("eval.reference",)


def add_fidelity(runs: Sequence[Run], reference: str | Path) -> None:
    """Adds ``<set>/agreement`` and ``<set>/total_variation`` against the finished run
    ``reference`` to every run's metrics, from the runs' ``predictive/`` files.

    Raises:
      UserError: when a run or the reference lacks its predictive, or their data differ.
    """
    ref_prints, ref_probs = fidelity.read_predictive(reference, f"--reference {reference}")
    for r in runs:
        prints, probs = fidelity.read_predictive(r.path, f"run {r.path}")
        what = f"run {r.path} against --reference"
        sets = fidelity.shared_sets(prints, ref_prints, what)
        if prints.get("task") != "regression":
            r.metrics.update(fidelity.fidelity_metrics(probs, ref_probs, sets))
            continue
        RF.check_target(prints, ref_prints, what)  # W2, mean and std errors of the mixtures
        mine, ref = ({n: RF.from_file(p[n]) for n in sets} for p in (probs, ref_probs))
        r.metrics.update(RF.fidelity_metrics(mine, ref, sets))


def is_regression(runs: Sequence[Run]) -> bool:
    """Whether the runs are regression runs (each reports ``test/rmse``)."""
    return bool(runs) and all("test/rmse" in r.metrics for r in runs)


def compare(
    dirs: Sequence[str | Path],
    out: str | Path | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    by: Sequence[str] | None = None,
    plots: bool = True,
    reference: str | Path | None = None,
    figures: bool = False,
) -> tuple[str, Path]:
    """Compares the runs below ``dirs``; returns the Markdown table and the output folder.

    ``reference``: a finished run's folder; adds agreement and total variation against
    its predictive (see ``add_fidelity``). ``figures``: also draw cost against quality,
    fidelity against cost and the reliability diagrams (``compare_figures``).
    """
    found = survey(dirs)
    runs = found.runs
    if not runs:
        raise FileNotFoundError(
            f"no metrics.json below {', '.join(map(str, dirs))}; only finished runs can be "
            f"compared ({status_summary(found)}; bnn-bench-compare --status lists them)."
        )
    regression = is_regression(runs)
    if regression and tuple(metrics) == DEFAULT_METRICS:
        metrics = REGRESSION_METRICS
    if reference is not None:
        add_fidelity(runs, reference)
        metrics = [*metrics, *(REGRESSION_FIDELITY if regression else FIDELITY_METRICS)]
        for e in [*runs, *found.jobs]:  # e.g. a second HMC seed run with eval.reference=...
            for key in REFERENCE_ONLY:
                e.overrides.pop(key, None)
    out = Path(out) if out is not None else Path(dirs[0]) / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    keys, groups = group_runs(runs, by, found.jobs)
    shown = pick_metrics(runs, metrics)
    table = markdown_table(keys, groups, shown, spread="se" if regression else "std")
    spread = (
        "mean ± se (std with ddof=1, over √n) over seeds and splits"
        if regression
        else "mean ± std (ddof=1) over seeds"
    )
    scores = "W2, mean and std errors" if regression else "Agreement and total variation"
    header = (
        f"{len(runs)} runs in {len(groups)} groups"
        f"{' by ' + ', '.join(keys) if keys else ''}; {spread}."
        + (f" {scores} against {reference}." if reference else "")
    )
    report = "\n".join([header, "", table, "", *status_lines(found, finished=False)])
    (out / "comparison.md").write_text(report + "\n")
    write_csv(out / "comparison.csv", keys, groups, pick_metrics(runs, ["*"]))
    if plots:
        plot = plot_regression_comparison if regression else plot_comparison
        plot(out, [g for g in groups if g.runs])
    if figures:
        plot_figures(out, [g for g in groups if g.runs], reference)
    return report, out


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
    parser.add_argument(
        "--plot",
        action="store_true",
        help="also draw cost_quality.png (test NLL and ECE against gradient evaluations and "
        "wall time, Pareto front marked), fidelity.png (agreement against cost, with the "
        "reference) and reliability_grid.png (reliability diagrams side by side)",
    )
    parser.add_argument(
        "--status",
        action="store_true",
        help="list every job below DIR (finished, failed, crashed, running, unfinished, "
        "missing, unreadable) and write nothing; exit 1 unless all finished",
    )
    args = parser.parse_args(argv)
    if args.status:
        found = survey(args.dirs)
        print("\n".join(status_lines(found, finished=True)))
        return 0 if not found.jobs else 1
    try:
        table, out = compare(
            args.dirs,
            args.out,
            args.metrics.split(","),
            args.by.split(",") if args.by else None,
            not args.no_plots,
            args.reference,
            args.plot,
        )
    except (FileNotFoundError, UserError) as e:
        print(f"bnn-bench-compare: error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(
        f"\nwrote {out}/comparison.md, comparison.csv"
        + "".join(f", {p.name}" for p in sorted(out.glob("*.png")))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
