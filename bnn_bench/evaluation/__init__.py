"""Evaluation: streaming predictive summaries and the metrics computed from them.

Every number comes from a ``PredictiveSummary`` (sums over members, O(N·C)), so
every method is judged by the same code whatever its number of members S.
Keys are ``<set>/<metric>`` in ``metrics.json``; this module returns them without
the set prefix (``compute``) or with it (``evaluate``). docs/evaluation.md
documents each key.

This is classification's evaluation; a regression run's (members' Gaussians, RMSE, NLL,
CRPS, intervals) is in ``regression``, and ``tasks.task_of`` picks one per run.
"""

from __future__ import annotations

import math

import numpy as np

from bnn_bench.evaluation import metrics as M
from bnn_bench.evaluation.diagnostics import chain_metrics
from bnn_bench.evaluation.summary import EvalInputs, PredictiveSummary

__all__ = [
    "EvalInputs",
    "PredictiveSummary",
    "compute",
    "curves",
    "evaluate",
    "ood_metrics",
    "OOD_SCORES",
]


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _lists(tree):
    """numpy arrays to lists, recursively (metrics.json holds plain JSON)."""
    if isinstance(tree, dict):
        return {k: _lists(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        return tree.tolist()
    return tree


def compute(
    summary: PredictiveSummary, labels=None, num_bins: int = 15, uncertain_below: float = 0.5
) -> dict[str, float]:
    """The metrics of one evaluation set, keyed by stable names (no set prefix).

    Args:
      summary: members folded over N inputs.
      labels: (N,) integer labels, or None for an unlabelled (OOD) set: then only
        the label-free quantities are returned.
      num_bins: bins of ECE, adaptive ECE and MCE.
      uncertain_below: a prediction whose confidence is below this is "uncertain".
    """
    probs = _f64(summary.mean())  # (N, C) posterior predictive
    conf = probs.max(-1)
    out = {
        "members": float(summary.count),
        "confidence": float(conf.mean()),
        "entropy": float(_f64(summary.predictive_entropy()).mean()),
        "expected_entropy": float(_f64(summary.expected_entropy()).mean()),
        "mutual_info": float(_f64(summary.mutual_information()).mean()),
        "certainty": float(_f64(summary.agreement()).mean()),
        "uncertain": float(np.mean(conf < uncertain_below)),
    }
    if summary.trace is not None:  # a sampler's chains: split-R̂ and ESS
        out |= chain_metrics(summary.trace.draws())
    if labels is None:
        return out
    labels = np.asarray(labels)
    errors = probs.argmax(-1) != labels
    out |= {
        "acc": M.accuracy(probs, labels),
        "acc_hard": float(np.mean(np.asarray(summary.hard_vote()) == labels)),
        # exact, from the members' log-probabilities, when the summary knows the labels
        "nll": M.nll(probs, labels)
        if summary.label_logp is None
        else float(_f64(summary.nll()).mean()),
        "brier": M.brier(probs, labels),
        "ece": M.ece(probs, labels, num_bins),
        "aece": M.aece(probs, labels, num_bins),
        "mce": M.mce(probs, labels, num_bins),
        "aurc": M.aurc(conf, errors),
        "augrc": M.augrc(conf, errors),
        "cov_at_5risk": M.coverage_at_risk(conf, errors, 0.05),
        "risk_at_80cov": M.risk_at_coverage(conf, errors, 0.8),
    }
    return out


def curves(
    summary: PredictiveSummary,
    labels,
    num_bins: int = 15,
    uncertain_below: float = 0.5,
    points: int = 101,
) -> dict[str, dict]:
    """Curves of one labelled evaluation set for metrics.json (numpy arrays).

    ``risk_coverage`` is sampled at ``points`` coverages (0, 1] to keep the file small.
    """
    probs = _f64(summary.mean())
    labels = np.asarray(labels)
    cov, risk = M.risk_coverage(probs.max(-1), probs.argmax(-1) != labels)
    grid = np.linspace(0.0, 1.0, points)[1:]
    idx = np.clip(np.ceil(grid * cov.shape[0]).astype(int) - 1, 0, cov.shape[0] - 1)
    return _lists(
        {
            "reliability": M.calibration_bins(probs, labels, num_bins),
            "risk_coverage": {"coverage": cov[idx], "risk": risk[idx]},
            "accuracy_over_certainty": M.accuracy_over_certainty(
                summary.hard_vote(), summary.agreement(), labels
            ),
            "accuracy_over_confidence": M.accuracy_over_confidence(probs, labels),
            "uncertain_per_class": {
                "below": uncertain_below,
                "count": M.uncertain_per_class(probs, labels, summary.num_classes, uncertain_below),
                "total": np.bincount(labels, minlength=summary.num_classes),
            },
        }
    )


# Scores that are higher for inputs the model should flag as out-of-distribution.
OOD_SCORES = {
    "msp": lambda s: -_f64(s.mean()).max(-1),  # negated maximum softmax probability
    "entropy": lambda s: _f64(s.predictive_entropy()),
    "mi": lambda s: _f64(s.mutual_information()),
}


def ood_metrics(inside: PredictiveSummary, outside: PredictiveSummary) -> dict[str, float]:
    """AUROC, AUPR (OOD positive) and FPR at 95% TPR for each score in ``OOD_SCORES``.

    Mutual information is zero for one member, so its metrics are NaN when S = 1.
    """
    out = {}
    for name, score in OOD_SCORES.items():
        s_in, s_out = score(inside), score(outside)
        single = name == "mi" and float(inside.count) <= 1
        out[f"auroc_{name}"] = math.nan if single else M.auroc(s_in, s_out)
        out[f"aupr_{name}"] = math.nan if single else M.aupr(s_in, s_out)
        out[f"fpr95_{name}"] = math.nan if single else M.fpr_at_tpr(s_in, s_out, 0.95)
    return out


def evaluate(
    summaries: dict[str, PredictiveSummary],
    labels: dict[str, object],
    num_bins: int = 15,
    uncertain_below: float = 0.5,
    ood_reference: str = "test",
) -> tuple[dict[str, float], dict[str, dict]]:
    """Metrics and curves of every evaluation set of a run.

    Args:
      summaries: set name -> summary (``test``, ``val``, ``ood``, ``shift/<c>/<level>``).
      labels: set name -> (N,) labels, or None for unlabelled sets (``ood``).
      num_bins, uncertain_below: as for ``compute``.
      ood_reference: the in-distribution set the ``ood`` set is told apart from.

    Returns:
      ``{"<set>/<metric>": value}`` with ``ood/auroc_<score>`` etc. when an ``ood``
      set is present, and ``{"<set>": curves}`` for labelled sets that are not
      shifted copies (those are summarised by the ``shift`` curves instead).
    """
    metrics: dict[str, float] = {}
    out_curves: dict[str, dict] = {}
    for name, summary in summaries.items():
        y = labels.get(name)
        for key, value in compute(summary, y, num_bins, uncertain_below).items():
            metrics[f"{name}/{key}"] = value
        if y is not None and not name.startswith("shift/"):
            out_curves[name] = curves(summary, y, num_bins, uncertain_below)
    if "ood" in summaries and ood_reference in summaries:
        for key, value in ood_metrics(summaries[ood_reference], summaries["ood"]).items():
            metrics[f"ood/{key}"] = value
    shift = shift_curves(metrics)
    if shift:
        out_curves["shift"] = shift
    return metrics, out_curves


def shift_curves(
    metrics: dict[str, float], keys=("acc", "nll", "ece", "brier", "entropy")
) -> dict[str, dict]:
    """``{corruption: {"level": [...], "acc": [...], ...}}`` from ``shift/<c>/<level>/<key>``
    metrics, levels in increasing order, with the clean test set as level 0."""
    table: dict[str, dict[float, dict[str, float]]] = {}
    for k, v in metrics.items():
        parts = k.split("/")
        if parts[0] == "shift" and len(parts) == 4 and parts[3] in keys:
            table.setdefault(parts[1], {}).setdefault(float(parts[2]), {})[parts[3]] = v
    out = {}
    for corruption, by_level in table.items():
        if "test/acc" in metrics:
            by_level.setdefault(0.0, {key: metrics.get(f"test/{key}", math.nan) for key in keys})
        levels = sorted(by_level)
        out[corruption] = {"level": levels} | {
            key: [by_level[lv].get(key, math.nan) for lv in levels] for key in keys
        }
    return out
