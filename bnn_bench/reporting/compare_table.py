"""The comparison's table: runs grouped by their differing overrides, mean ± std per
metric (Markdown and CSV), and the status lines of the jobs left out."""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnn_bench.reporting.runs import Job, Run, Survey
from bnn_bench.run_folder import METRICS

AGGREGATED = ("seed",)  # varied to measure spread, not to compare


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

    def mean_se(self, metric: str) -> tuple[float, float]:
        """The mean and its standard error, std (ddof = 1) / √n, over the group's runs (the
        UCI tables' "mean ± se over the splits")."""
        mean, std = self.mean_std(metric)
        return mean, std / math.sqrt(self.values(metric).size) if not math.isnan(std) else std


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


def markdown_table(
    by: Sequence[str], groups: Sequence[Group], metrics: Sequence[str], spread: str = "std"
) -> str:
    """A Markdown table: one row per group, ``mean ± std`` (``spread="se"``: ``mean ± se``)
    per metric."""
    head = [*(by or ["runs"]), "n", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [*(g.label.values() if by else ["all"]), g.count]
        stat = g.mean_se if spread == "se" else g.mean_std
        cells += [_fmt(*stat(m)) for m in metrics]
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
        listed = [(r"finished", r.path, METRICS) for r in found.runs] + listed
    elif listed:
        lines.append("left out of the table:")
    lines += [f"  {state:<10} {_show(path)}  {reason}" for state, path, reason in listed]
    return lines + translated_lines(found)


def translated_lines(found: Survey) -> list[str]:
    """One line per metrics.json read with old metric keys (``runs.OLD_KEYS``), naming
    the file and its renamed keys; none when there was none."""
    if not found.translated:
        return []
    lines = [f"old metric names translated in {len(found.translated)} {METRICS} file(s):"]
    for r in found.translated:
        renamed = ", ".join(f"{old} -> {new}" for old, new in r.renamed.items())
        lines.append(f"  {_show(r.path / METRICS)}  {renamed}")
    return lines


def _show(path: Path) -> str:
    """``path`` relative to the working folder when it is below it."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    return str(path)
