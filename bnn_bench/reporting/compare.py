"""``bnn-bench-compare DIR...``: one table and a few plots across finished runs.

Reads ``metrics.json`` of every run below the given folders (a multirun's sweep
folder, several single runs, or a mix), groups the runs by the overrides that
differ between them (``method``, ``dataset``, ...; read from each run's
``.hydra/overrides.yaml``), and reports each metric as mean ± std over the runs
of a group (the seeds). Works offline; W&B is not involved.

Outputs, in ``--out`` (default ``<first DIR>/comparison``):
  comparison.md   the table printed to the terminal (Markdown)
  comparison.csv  one row per group: the group's overrides, ``runs`` (finished), ``jobs``
                  (finished or not), ``seeds``,
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
import contextlib
import csv
import fnmatch
import json
import math
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnn_bench.errors import UserError
from bnn_bench.evaluation import fidelity
from bnn_bench.reporting.loggers import NOT_IDENTITY, override_key, read_overrides

ERROR_FILE, LOCK_FILE, METRICS_FILE = "error.txt", ".lock", "metrics.json"
# a job's states, in the order the status lists them
STATES = ("finished", "failed", "crashed", "running", "unfinished", "missing", "unreadable")

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
    """One finished run: its folder, overrides (``{key: value}``) and metrics.json;
    ``job``: what it computes (its resolved config, how-to-run keys left out)."""

    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float]
    curves: dict = field(default_factory=dict)
    job: str = ""


@dataclass
class Job:
    """A job without results to compare: its state (``STATES``), the file or folder that
    says so, the reason in a few words, its overrides and what it computes."""

    state: str
    path: Path
    reason: str
    overrides: dict[str, str]
    job: str = ""


@dataclass
class Survey:
    """What the folders hold: finished runs (each job once), the jobs without results
    (one entry per job), and the folders left out as duplicates of a counted job."""

    runs: list[Run]
    jobs: list[Job]
    duplicates: list[Job]

    def counts(self) -> dict[str, int]:
        """Jobs per state (``finished`` first)."""
        out = dict.fromkeys(STATES, 0)
        out["finished"] = len(self.runs)
        for j in self.jobs:
            out[j.state] += 1
        return out


@dataclass
class Group:
    """The runs that share every differing override but the seed, and the group's jobs
    that have no results (``unfinished``: failed, crashed, missing, ...)."""

    label: dict[str, str]
    runs: list[Run]
    unfinished: list[Job] = field(default_factory=list)

    @property
    def count(self) -> str:
        """``n`` finished runs, or ``n of m`` jobs when some have no results."""
        n, m = len(self.runs), len(self.runs) + len(self.unfinished)
        return str(n) if n == m else f"{n} of {m}"

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
    """Every finished run below ``dirs``, each job once (sorted by path); see ``survey``."""
    return survey(dirs).runs


def survey(dirs: Sequence[str | Path]) -> Survey:
    """Every run folder below ``dirs`` and the state of its job, each job counted once.

    A folder is a run folder when it holds ``.hydra/``, ``metrics.json`` or ``error.txt``.
    Two finished folders of the same job (same resolved config, seed included) keep the
    newest metrics.json; the others are listed as duplicates. A sweep folder made with
    job folders named by their overrides (conf/config.yaml) also gives the jobs of its
    last launch that have no folder (missing).
    """
    folders: set[Path] = set()
    for d in dirs:
        d = Path(d)
        for pattern in (METRICS_FILE, ERROR_FILE):
            folders.update(p.parent.resolve() for p in d.rglob(pattern))
        folders.update(p.parent.resolve() for p in d.rglob(".hydra") if p.is_dir())
    runs: list[Run] = []
    jobs: list[Job] = []
    for folder in sorted(folders):
        entry = _read_folder(folder)
        (runs if isinstance(entry, Run) else jobs).append(entry)
    for d in dirs:
        jobs += _missing(Path(d), folders)
    # each job once: the newest finished folder counts; a job that finished somewhere is
    # not also unfinished elsewhere (an older launch's folder)
    newest: dict[str, Run] = {}
    for r in runs:
        kept = newest.get(r.job)
        if kept is None or _mtime(r.path) > _mtime(kept.path):
            newest[r.job] = r
    duplicates = [
        Job("duplicate", r.path, f"the same job as {newest[r.job].path} (newer)", r.overrides)
        for r in runs
        if newest[r.job] is not r
    ]
    pending: dict[str, Job] = {}
    for j in jobs:
        if j.job in newest:
            duplicates.append(
                Job(
                    "duplicate",
                    j.path,
                    f"{j.state}: {j.reason}; the same job finished in {newest[j.job].path}",
                    j.overrides,
                )
            )
        elif j.job in pending and j.state != "missing":
            duplicates.append(
                Job(
                    "duplicate",
                    j.path,
                    f"{j.state}: {j.reason}; the same job as {pending[j.job].path}",
                    j.overrides,
                )
            )
        else:
            pending.setdefault(j.job, j)
    counted = [r for r in runs if newest[r.job] is r]
    return Survey(counted, list(pending.values()), duplicates)


def _mtime(folder: Path) -> int:
    with contextlib.suppress(OSError):
        return (folder / METRICS_FILE).stat().st_mtime_ns
    return 0


def _overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``{key: value}`` of the overrides that say what a run computes."""
    out = {}
    for o in overrides:
        key = override_key(o)
        if key.split(".")[0] not in NOT_IDENTITY:
            out[key] = o.split("=", 1)[1] if "=" in o else ""
    return out


def _job_of(folder: Path, overrides: Sequence[str]) -> str:
    """What a run computes, as one string: its resolved config (``.hydra/config.yaml``,
    else ``checkpoint/resume/run.json``) without how-to-run keys; else its overrides."""
    from omegaconf import OmegaConf

    from bnn_bench.checkpoint import identity
    from bnn_bench.sweep import job_overrides

    config = None
    with contextlib.suppress(Exception):  # an unresolvable or broken file: the next source
        loaded = OmegaConf.load(folder / ".hydra" / "config.yaml")
        try:
            config = OmegaConf.to_container(loaded, resolve=True)
        except Exception:  # noqa: BLE001 - e.g. an interpolation of a key no longer there
            config = OmegaConf.to_container(loaded)
    if not isinstance(config, dict):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            config = json.loads((folder / "checkpoint/resume/run.json").read_text())["config"]
    if isinstance(config, dict):
        return "config " + json.dumps(identity(config), sort_keys=True)
    return "overrides " + ",".join(job_overrides(overrides))


def _read_folder(folder: Path) -> Run | Job:
    """A finished ``Run``, or the ``Job`` saying why the folder has no results."""
    try:
        listed = read_overrides(folder)
    except Exception as e:  # noqa: BLE001 - whatever the YAML parser raises
        return Job("unreadable", folder / ".hydra" / "overrides.yaml", _why(e), {}, str(folder))
    overrides, job = _overrides(listed), _job_of(folder, listed)
    metrics_path = folder / METRICS_FILE
    if metrics_path.is_file():
        try:
            payload = json.loads(metrics_path.read_text())
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            return Job("unreadable", metrics_path, _why(e), overrides, job)
        curves = payload.pop("curves", {})
        metrics = {k: v for k, v in payload.items() if isinstance(v, int | float)}
        if "time/total" not in metrics and all(k in metrics for k in STAGES):
            metrics["time/total"] = float(sum(metrics[k] for k in STAGES))
        return Run(folder, overrides, metrics, curves if isinstance(curves, dict) else {}, job)
    error = folder / ERROR_FILE
    if error.is_file():
        text = error.read_text(errors="replace").strip()
        first = text.splitlines()[0] if text else "(empty)"
        state = "crashed" if "Traceback (most recent call last)" in text else "failed"
        return Job(state, error, first, overrides, job)
    holder = _live_holder(folder)
    if holder:
        return Job("running", folder, f"no metrics.json yet; held by {holder}", overrides, job)
    return Job(
        "unfinished",
        folder,
        "no metrics.json (interrupted or killed; re-launch the same command to continue it)",
        overrides,
        job,
    )


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def _live_holder(folder: Path) -> str | None:
    """``pid N`` when the process that took the folder's lock runs on this host still."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        words = (folder / LOCK_FILE).read_text().split()  # "pid N on HOST"
        pid, host = int(words[1]), words[3]
        if host == socket.gethostname():
            os.kill(pid, 0)
            return f"pid {pid} on {host}"
    return None


def _last_launch(sweep_dir: Path) -> list[list[str]]:
    """The jobs (their overrides) of the sweep's last launch, from its multirun.yaml, when
    its jobs' folders are named by their overrides and Hydra's basic sweeper made them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    try:
        hydra = OmegaConf.load(path).hydra
        if "bnn_bench.job_dir" not in str(OmegaConf.to_container(hydra.sweep)["subdir"]):
            return []  # numbered job folders (an older bnn-bench): the names cannot be known
        if not str(hydra.sweeper._target_).endswith("BasicSweeper"):
            return []  # another sweeper (Optuna) picks its jobs as it goes
        params = [f"{k}={v}" for k, v in (hydra.sweeper.params or {}).items()]
        lines = [*params, *(str(o) for o in hydra.overrides.task)]
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        (batch,) = BasicSweeper.split_arguments(
            OverridesParser.create().parse_overrides(lines), None
        )
    except Exception:  # noqa: BLE001 - an unreadable multirun.yaml only loses the missing jobs
        return []
    return [list(job) for job in batch]


def _missing(sweep_dir: Path, folders: set[Path]) -> list[Job]:
    """The jobs of the sweep's last launch that have no folder below ``sweep_dir`` (by
    name, or by the overrides a folder holds: one named otherwise by an older bnn-bench)."""
    from bnn_bench.sweep import job_dir, job_overrides

    jobs = _last_launch(sweep_dir)
    held = set()
    for f in folders if jobs else ():
        with contextlib.suppress(Exception):  # an unreadable folder is listed on its own
            held.add(tuple(job_overrides(read_overrides(f))))
    out = []
    for overrides in jobs:
        folder = (sweep_dir / job_dir(overrides)).resolve()
        if folder not in folders and tuple(job_overrides(overrides)) not in held:
            out.append(
                Job(
                    "missing",
                    folder,
                    "no folder: the job has not started",
                    _overrides(overrides),
                    "overrides " + ",".join(job_overrides(overrides)),
                )
            )
    return out


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
    runs: Sequence[Run], by: Sequence[str] | None = None, jobs: Sequence[Job] = ()
) -> tuple[list[str], list[Group]]:
    """Groups runs by ``by`` or, if None, by every override whose value differs
    between runs and ``jobs`` (a missing override counts as ``default``), the seed
    excepted. ``jobs`` without results join their group's ``unfinished`` (a group may
    hold no run). Returns the grouping keys and the groups in first-seen order."""
    entries = [*runs, *jobs]
    if by is None:
        keys = sorted({k for e in entries for k in e.overrides})
        by = [
            k
            for k in keys
            if k not in AGGREGATED and len({e.overrides.get(k, "default") for e in entries}) > 1
        ]
    groups: dict[tuple, Group] = {}
    for e in entries:
        label = {k: e.overrides.get(k, "default") for k in by}
        group = groups.setdefault(tuple(label.items()), Group(label, []))
        (group.runs if isinstance(e, Run) else group.unfinished).append(e)
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
        cells = [*(g.label.values() if by else ["all"]), g.count]
        cells += [_fmt(*g.mean_std(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(
    path: Path, by: Sequence[str], groups: Sequence[Group], metrics: Sequence[str]
) -> None:
    """Full-precision means and stds; one row per group (``runs``: finished, ``jobs``: all
    the group's jobs, finished or not)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        stats = (f"{m}/{s}" for m in metrics for s in ("mean", "std"))
        w.writerow([*by, "runs", "jobs", "seeds", *stats])
        for g in groups:
            seeds = " ".join(r.overrides.get("seed", "default") for r in g.runs)
            row: list = [*g.label.values(), len(g.runs), len(g.runs) + len(g.unfinished), seeds]
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
    found = survey(dirs)
    runs = found.runs
    if not runs:
        raise FileNotFoundError(
            f"no metrics.json below {', '.join(map(str, dirs))}; only finished runs can be "
            f"compared ({status_summary(found)}; bnn-bench-compare --status lists them)."
        )
    if reference is not None:
        add_fidelity(runs, reference)
        metrics = [*metrics, *FIDELITY_METRICS]
        for e in [*runs, *found.jobs]:  # e.g. a second HMC seed run with eval.reference=...
            for key in REFERENCE_ONLY:
                e.overrides.pop(key, None)
    out = Path(out) if out is not None else Path(dirs[0]) / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    keys, groups = group_runs(runs, by, found.jobs)
    shown = pick_metrics(runs, metrics)
    table = markdown_table(keys, groups, shown)
    header = (
        f"{len(runs)} runs in {len(groups)} groups"
        f"{' by ' + ', '.join(keys) if keys else ''}; mean ± std (ddof=1) over seeds."
        + (f" Agreement and total variation against {reference}." if reference else "")
    )
    report = "\n".join([header, "", table, "", *status_lines(found, finished=False)])
    (out / "comparison.md").write_text(report + "\n")
    write_csv(out / "comparison.csv", keys, groups, pick_metrics(runs, ["*"]))
    if plots:
        plot_comparison(out, [g for g in groups if g.runs])
    return report, out


def status_summary(found: Survey) -> str:
    """``6 of 8 jobs finished, 1 failed, 1 missing``: the counts, at a glance."""
    counts = found.counts()
    total = sum(counts.values())
    rest = [f"{n} {state}" for state, n in counts.items() if state != "finished" and n]
    dup = len(found.duplicates)
    return ", ".join(
        [
            f"{counts['finished']} of {total} jobs finished",
            *rest,
            *([f"{dup} duplicate folder(s) left out"] if dup else []),
        ]
    )


def status_lines(found: Survey, finished: bool) -> list[str]:
    """The status line and one line per job left out of the table (``finished``: also
    each finished job): state, file or folder, reason."""
    lines = [f"status: {status_summary(found)}."]
    listed = [(j.state, j.path, j.reason) for j in [*found.jobs, *found.duplicates]]
    if finished:
        listed = [(r"finished", r.path, "metrics.json") for r in found.runs] + listed
    elif listed:
        lines.append("left out of the table:")
    lines += [f"  {state:<10} {_show(path)}  {reason}" for state, path, reason in listed]
    return lines


def _show(path: Path) -> str:
    """``path`` relative to the working folder when it is below it."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    return str(path)


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
