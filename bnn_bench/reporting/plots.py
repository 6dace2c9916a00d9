"""Plots as PNG files in the run folder's ``plots/``; each reads without the code.

``write_all`` draws every plot a run can have from its summaries, evaluation sets
and metrics (the figures themselves are in ``figures``). Plots that need several
members (box plots of the members' probabilities, agreement, member-std error bars)
are skipped with a log note when S = 1. "Risk" here means selective risk only (the
risk-coverage curve).
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np

from bnn_bench.reporting.figures import (
    accuracy_over_certainty,
    accuracy_vs_threshold,
    member_boxplots,
    member_std_extremes,
    ood_histograms,
    reliability_diagram,
    risk_coverage,
    shift_curves,
    shorten,
    traces,
    uncertain_images,
    uncertain_per_class,
)

log = logging.getLogger(__name__)


def write_all(
    folder: Path,
    title: str,
    summaries: dict,
    sets: dict,
    metrics: dict,
    curves: dict,
    spec,
    num_images: int = 16,
    num_extremes: int = 3,
) -> dict[str, Path]:
    """Every plot of a run; returns ``{name: path}`` for the logger.

    Args:
      folder: the run's ``plots/`` folder.
      title: method · model · dataset, the first line of every title.
      summaries, sets: the evaluation sets' summaries and splits (``test`` needed).
      metrics, curves: what ``evaluation.evaluate`` returned.
      spec: the dataset spec (class names).
    """
    folder = Path(folder)
    names = list(spec.class_names)
    test, split = summaries["test"], sets["test"]
    c = curves["test"]
    s = int(test.count)
    head = f"{title} · test set, S = {s}"
    out: dict[str, Path] = {}
    m = lambda k: metrics.get(f"test/{k}", float("nan"))  # noqa: E731

    out["reliability"] = reliability_diagram(
        folder / "reliability.png",
        c["reliability"],
        f"{head}\nacc {100 * m('acc'):.2f}%, ECE {100 * m('ece'):.2f}%, MCE {100 * m('mce'):.2f}%",
    )
    out["accuracy_vs_threshold"] = accuracy_vs_threshold(
        folder / "accuracy_vs_threshold.png",
        c["accuracy_over_confidence"],
        f"{head}\naccuracy and inputs dropped vs confidence threshold",
    )
    out["risk_coverage"] = risk_coverage(
        folder / "risk_coverage.png",
        c["risk_coverage"],
        m("aurc"),
        f"{head}\nrisk-coverage (selective prediction)",
    )
    out["uncertain_per_class"] = uncertain_per_class(
        folder / "uncertain_per_class.png",
        c["uncertain_per_class"],
        names,
        f"{head}\nuncertain predictions per class",
    )

    mean = np.asarray(test.mean(), np.float64)
    y = np.asarray(split.y)
    entropy = np.asarray(test.predictive_entropy(), np.float64)
    top = np.argsort(-entropy, kind="stable")[:num_images]
    out["uncertain_images"] = uncertain_images(
        folder / "uncertain_images.png",
        np.asarray(split.x[top]),
        y[top],
        mean[top].argmax(-1),
        mean[top].max(-1),
        entropy[top],
        shorten(names, 14),
        textwrap.fill(
            f"{head}: the {len(top)} most uncertain test images "
            "(highest predictive entropy); red = wrong",
            90,
        ),
    )

    if s > 1:
        kept = np.asarray(test.kept_members())
        idx = np.asarray(test.keep_idx)
        if kept.size:
            out["member_boxplots"] = member_boxplots(
                folder / "member_boxplots.png",
                np.asarray(split.x[idx]),
                kept,
                y[idx],
                idx,
                names,
                f"{head}: class probabilities of {kept.shape[0]} members, "
                f"{len(idx)} fixed test images",
            )
        out["accuracy_over_certainty"] = accuracy_over_certainty(
            folder / "accuracy_over_certainty.png",
            c["accuracy_over_certainty"],
            f"{head}\nhard-vote accuracy over member agreement (certainty)",
        )
        std = np.sqrt(np.asarray(test.variance(), np.float64))
        summed_std = std.sum(-1)
        order = np.argsort(summed_std, kind="stable")
        pick = np.r_[order[:num_extremes], order[-num_extremes:]]
        out["member_std_extremes"] = member_std_extremes(
            folder / "member_std_extremes.png",
            np.asarray(split.x[pick]),
            mean[pick],
            std[pick],
            y[pick],
            summed_std[pick],
            num_extremes,
            names,
            f"{head}: lowest (top) and highest (bottom) summed member std "
            "(sum over classes of the members' std)",
        )
    else:
        log.info(
            "plots: S = 1, so member box plots, accuracy over member agreement and "
            "member-std error bars are skipped (they need several members)"
        )
    trace = test.trace.draws() if test.trace is not None else None  # a sampler's chains
    if trace is not None and trace.shape[1] > 0:
        out["traces"] = traces(
            folder / "traces.png",
            trace,
            metrics.get("test/rhat", float("nan")),
            metrics.get("test/ess", float("nan")),
            f"{title}: per-chain traces of the test log-likelihood",
        )

    if "shift" in curves:
        out["shift"] = shift_curves(
            folder / "shift.png", curves["shift"], f"{title}: metrics under distribution shift"
        )
    if "ood" in summaries:
        from bnn_bench.evaluation import OOD_SCORES

        scores = {
            "max prob": (-OOD_SCORES["msp"](test), -OOD_SCORES["msp"](summaries["ood"])),
            "predictive entropy": (
                OOD_SCORES["entropy"](test),
                OOD_SCORES["entropy"](summaries["ood"]),
            ),
        }
        if s > 1:
            scores["mutual information"] = (
                OOD_SCORES["mi"](test),
                OOD_SCORES["mi"](summaries["ood"]),
            )
        aurocs = {
            "max prob": metrics.get("ood/auroc_msp", float("nan")),
            "predictive entropy": metrics.get("ood/auroc_entropy", float("nan")),
            "mutual information": metrics.get("ood/auroc_mi", float("nan")),
        }
        out["ood_scores"] = ood_histograms(
            folder / "ood_scores.png", scores, aurocs, f"{title}: test vs OOD inputs"
        )
    return out
