"""Evaluation: streaming predictive summaries and the metrics computed from them."""

from __future__ import annotations

import numpy as np

from bnn_bench.evaluation import metrics as M
from bnn_bench.evaluation.summary import EvalPlan, PredictiveSummary

__all__ = ["EvalPlan", "PredictiveSummary", "compute", "curves"]


def compute(summary: PredictiveSummary, labels, num_bins: int = 15) -> dict[str, float]:
    """The metrics of one evaluation set, keyed by stable names (no split prefix).

    Args:
      summary: members folded over N inputs.
      labels: (N,) integer labels.
      num_bins: bins of the calibration error.
    """
    probs = summary.mean()
    return {
        "acc": M.accuracy(probs, labels),
        "nll": M.nll(probs, labels),
        "brier": M.brier(probs, labels),
        "ece": M.ece(probs, labels, num_bins),
        "members": float(summary.count),
    }


def curves(summary: PredictiveSummary, labels, num_bins: int = 15) -> dict[str, list]:
    """Curves of one evaluation set for metrics.json (lists, JSON-ready)."""
    bins = M.calibration_bins(summary.mean(), labels, num_bins)
    return {"reliability": {k: np.asarray(v).tolist() for k, v in bins.items()}}
