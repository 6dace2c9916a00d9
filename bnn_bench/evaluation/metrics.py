"""Metrics as plain functions of predictive probabilities (N, C) and labels (N,).

Conventions follow TorchUncertainty where it has the metric:

- accuracy in [0, 1]; NLL in nats, averaged over inputs; Brier score summed over
  classes and averaged over inputs (in [0, 2]).
- Calibration is top-label: confidence = max_c p(c | x), correct = argmax == label.
  ECE uses ``num_bins`` equal-width bins over (0, 1] weighted by bin size; adaptive
  ECE (Nixon et al., 2019) uses ``num_bins`` equal-mass bins of the sorted
  confidences (``np.array_split``, as ``torch.tensor_split``); MCE is the largest
  gap over non-empty equal-width bins.
- Selective classification (Geifman & El-Yaniv, 2017; Traub et al., 2024) ranks
  inputs by confidence, most confident first (ties keep input order), and
  accepts the top k: coverage k/N, selective risk = errors among them / k.
  AURC and AUGRC are trapezoidal areas over coverage 1/N..1 divided by
  (1 - 1/N), as TorchUncertainty normalises them.

All functions take numpy or jax arrays and return Python floats or numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np

_TINY = 1e-12


def _np(probs, labels=None):
    probs = np.asarray(probs, np.float64)
    if labels is None:
        return probs
    return probs, np.asarray(labels).astype(np.int64)


def accuracy(probs, labels) -> float:
    """Share of inputs whose most probable class is the label (soft voting when
    ``probs`` is the posterior predictive)."""
    probs, labels = _np(probs, labels)
    return float(np.mean(probs.argmax(-1) == labels))


def nll(probs, labels, xp=np):
    """Mean negative log-likelihood of the labels (nats); probabilities clipped at 1e-12.

    For probabilities only (a saved predictive, a training log, Laplace's prior-precision
    grid), where ``xp=jax.numpy`` serves jitted code. A member's NLL comes from its
    log-probabilities (``nll_of_log_probs``) and the posterior predictive's from the
    summary (``PredictiveSummary.nll``), both exact below the clip.

    Args:
      probs: (..., N, C) class probabilities; leading axes (e.g. chains) are averaged too.
      labels: (N,) integer labels.
      xp: ``numpy`` (the default: float64 on the host, returns a float) or
        ``jax.numpy`` (traceable; returns a scalar array in the dtype of ``probs``).
    """
    if xp is np:
        probs, labels = _np(probs, labels)
    idx = xp.broadcast_to(labels[..., None], (*probs.shape[:-1], 1))
    p = xp.take_along_axis(probs, idx, axis=-1)[..., 0]
    out = -xp.mean(xp.log(xp.clip(p, _TINY, None)))
    return float(out) if xp is np else out


def nll_of_log_probs(log_probs, labels, xp=np):
    """Mean negative log-likelihood of the labels (nats) from log-probabilities: exact,
    nothing clipped (a probability of 1e-30 counts as 69 nats, not 27.6).

    Args:
      log_probs: (..., N, C) class log-probabilities (``log_softmax`` of the logits);
        leading axes (e.g. chains) are averaged too.
      labels: (N,) integer labels.
      xp: ``numpy`` (float64 on the host, returns a float) or ``jax.numpy`` (traceable).
    """
    if xp is np:
        log_probs, labels = _np(log_probs, labels)
    idx = xp.broadcast_to(labels[..., None], (*log_probs.shape[:-1], 1))
    out = -xp.mean(xp.take_along_axis(log_probs, idx, axis=-1)[..., 0])
    return float(out) if xp is np else out


def brier(probs, labels) -> float:
    """Mean over inputs of the squared error to the one-hot label, summed over classes."""
    probs, labels = _np(probs, labels)
    onehot = np.eye(probs.shape[-1])[labels]
    return float(np.mean(np.sum(np.square(probs - onehot), axis=-1)))


def entropy(probs) -> np.ndarray:
    """(N,) entropy in nats of each row of ``probs`` (N, C)."""
    probs = _np(probs)
    return -np.sum(probs * np.log(np.clip(probs, _TINY, None)), axis=-1)


# --- fidelity to a reference predictive (Izmailov et al. 2021)


def agreement(probs, reference) -> float:
    """Share of inputs whose top-1 class under ``probs`` (N, C) is the top-1 class under
    ``reference`` (N, C); ties go to the lowest class index in both."""
    probs, reference = _np(probs), _np(reference)
    return float(np.mean(probs.argmax(-1) == reference.argmax(-1)))


def total_variation(probs, reference) -> float:
    """Mean over inputs of the total variation distance ½ Σ_c |p(c|x) − p_ref(c|x)|, in [0, 1]."""
    probs, reference = _np(probs), _np(reference)
    return float(np.mean(0.5 * np.sum(np.abs(probs - reference), axis=-1)))


# --- calibration


def calibration_bins(probs, labels, num_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability over ``num_bins`` equal-width confidence bins.

    Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; a confidence of
    exactly 0 falls in bin 0.

    Returns:
      ``count`` (num_bins,), ``confidence`` and ``accuracy`` (num_bins,) means per bin
      (0 where a bin is empty), and ``edges`` (num_bins + 1,).
    """
    probs, labels = _np(probs, labels)
    conf = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(np.float64)
    b = np.clip(np.ceil(conf * num_bins).astype(int) - 1, 0, num_bins - 1)
    count = np.bincount(b, minlength=num_bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return {
        "count": count,
        "confidence": np.bincount(b, weights=conf, minlength=num_bins) / safe,
        "accuracy": np.bincount(b, weights=correct, minlength=num_bins) / safe,
        "edges": np.linspace(0.0, 1.0, num_bins + 1),
    }


def ece(probs, labels, num_bins: int = 15) -> float:
    """Expected calibration error: sum_b |B_b|/N · |acc(B_b) - conf(B_b)|, equal-width bins."""
    bins = calibration_bins(probs, labels, num_bins)
    n = bins["count"].sum()
    return float(np.sum(bins["count"] / n * np.abs(bins["accuracy"] - bins["confidence"])))


def mce(probs, labels, num_bins: int = 15) -> float:
    """Maximum calibration error: max over non-empty equal-width bins of |acc - conf|."""
    bins = calibration_bins(probs, labels, num_bins)
    gap = np.abs(bins["accuracy"] - bins["confidence"])[bins["count"] > 0]
    return float(gap.max()) if gap.size else 0.0


def aece(probs, labels, num_bins: int = 15) -> float:
    """Adaptive ECE: as ECE, but the bins hold equal numbers of inputs (sorted by
    confidence, split with ``np.array_split``: the first bins get one more)."""
    probs, labels = _np(probs, labels)
    conf = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    n = conf.shape[0]
    total = 0.0
    for idx in np.array_split(order, min(num_bins, n)):
        total += idx.size / n * abs(correct[idx].mean() - conf[idx].mean())
    return float(total)


# --- selective classification


def risk_coverage(confidence, errors) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk at every coverage, most confident inputs accepted first.

    Args:
      confidence: (N,) higher means more certain.
      errors: (N,) 1 where the prediction is wrong.

    Returns:
      ``coverage`` (N,) = k/N for k = 1..N and ``risk`` (N,) = errors among the k
      most confident / k. Ties in confidence keep the input order.
    """
    confidence = np.asarray(confidence, np.float64)
    errors = np.asarray(errors, np.float64)
    n = confidence.shape[0]
    order = np.argsort(-confidence, kind="stable")
    k = np.arange(1, n + 1)
    return k / n, np.cumsum(errors[order]) / k


def _area(coverage, values) -> float:
    n = coverage.shape[0]
    if n < 2:
        return math.nan
    # np.trapezoid needs numpy >= 2
    trapezoid = np.sum(np.diff(coverage) * (values[1:] + values[:-1]) / 2)
    return float(trapezoid / (1.0 - 1.0 / n))


def aurc(confidence, errors) -> float:
    """Area under the risk-coverage curve (lower is better; in [0, 1])."""
    cov, risk = risk_coverage(confidence, errors)
    return _area(cov, risk)


def augrc(confidence, errors) -> float:
    """Area under the generalised risk-coverage curve: the risk counts errors among
    accepted inputs over all N inputs (risk · coverage), Traub et al. (2024)."""
    cov, risk = risk_coverage(confidence, errors)
    return _area(cov, risk * cov)


def coverage_at_risk(confidence, errors, risk: float = 0.05) -> float:
    """Largest coverage whose selective risk is at most ``risk``; NaN if none is."""
    cov, r = risk_coverage(confidence, errors)
    ok = np.nonzero(r <= risk)[0]
    return float(cov[ok[-1]]) if ok.size else math.nan


def risk_at_coverage(confidence, errors, coverage: float = 0.8) -> float:
    """Selective risk when the ceil(coverage · N) most confident inputs are accepted."""
    _, r = risk_coverage(confidence, errors)
    return float(r[max(math.ceil(r.shape[0] * coverage) - 1, 0)])


# --- agreement and thresholds (JaxSGMC, BlackJAX tutorials)

CERTAINTY_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CONFIDENCE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(20)) + (0.99,)


def accuracy_over_certainty(
    hard_pred, certainty, labels, thresholds=CERTAINTY_THRESHOLDS
) -> dict[str, np.ndarray]:
    """Hard-voting accuracy among inputs whose member agreement is >= each threshold
    (JaxSGMC CIFAR-10 tutorial).

    Args:
      hard_pred: (N,) majority class over members.
      certainty: (N,) share of members voting for it.
      labels: (N,).

    Returns:
      ``threshold``, ``accuracy`` (NaN where no input qualifies) and ``share``
      (the share of inputs that qualify), each (T,).
    """
    hard_pred, certainty, labels = map(np.asarray, (hard_pred, certainty, labels))
    # k/S computed in float32 must still reach t
    slack = [t - 1e-6 for t in thresholds]
    acc, share = _accuracy_above(certainty, hard_pred == labels, slack)
    return {"threshold": np.asarray(thresholds, np.float64), "accuracy": acc, "share": share}


def accuracy_over_confidence(
    probs, labels, thresholds=CONFIDENCE_THRESHOLDS
) -> dict[str, np.ndarray]:
    """Accuracy of the predictions whose confidence (max posterior-predictive
    probability) is >= each threshold, and the share of inputs kept (BlackJAX SGLD
    MNIST tutorial: "accuracy and % dropped versus threshold").

    Returns:
      ``threshold``, ``accuracy`` (NaN where nothing is kept), ``kept`` (T,).
    """
    probs, labels = _np(probs, labels)
    acc, kept = _accuracy_above(probs.max(-1), probs.argmax(-1) == labels, thresholds)
    return {"threshold": np.asarray(thresholds, np.float64), "accuracy": acc, "kept": kept}


def _accuracy_above(score, correct, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(T,) accuracy among the inputs with ``score >= t`` (NaN where none) and (T,) their
    share, for each threshold t."""
    acc, share = [], []
    for t in thresholds:
        sel = score >= t
        share.append(sel.mean())
        acc.append(correct[sel].mean() if sel.any() else math.nan)
    return np.asarray(acc), np.asarray(share, np.float64)


def uncertain_per_class(probs, labels, num_classes: int, below: float = 0.5) -> np.ndarray:
    """(C,) count of inputs of each true class whose confidence is below ``below``."""
    probs, labels = _np(probs, labels)
    uncertain = probs.max(-1) < below
    return np.bincount(labels[uncertain], minlength=num_classes)


# --- out-of-distribution detection (OOD = positive class, higher score = more OOD)


def _binary(scores_in, scores_out):
    scores = np.concatenate([np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)])
    is_out = np.concatenate([np.zeros(len(scores_in)), np.ones(len(scores_out))])
    return scores, is_out


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve for telling OOD (positive) from in-distribution inputs
    by a score that is higher for OOD; ties count one half (Mann-Whitney U)."""
    from scipy.stats import rankdata

    scores, is_out = _binary(scores_in, scores_out)
    n_out, n_in = is_out.sum(), (1 - is_out).sum()
    if n_out == 0 or n_in == 0:
        return math.nan
    ranks = rankdata(scores)  # average ranks handle ties
    return float((ranks[is_out == 1].sum() - n_out * (n_out + 1) / 2) / (n_out * n_in))


def _roc_points(scores_in, scores_out):
    """True/false positive counts at each distinct threshold, highest first."""
    scores, is_out = _binary(scores_in, scores_out)
    order = np.argsort(-scores, kind="stable")
    scores, is_out = scores[order], is_out[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.shape[0] - 1]  # end of each tie group
    tp = np.cumsum(is_out)[last]
    fp = (last + 1) - tp
    return tp, fp, is_out.sum(), (1 - is_out).sum()


def aupr(scores_in, scores_out) -> float:
    """Area under the precision-recall curve with OOD as positive, as average
    precision: sum_k (R_k - R_{k-1}) P_k over distinct thresholds."""
    tp, fp, n_out, _ = _roc_points(scores_in, scores_out)
    if n_out == 0:
        return math.nan
    precision = tp / (tp + fp)
    recall = tp / n_out
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """Share of in-distribution inputs flagged as OOD at the highest threshold that
    flags at least ``tpr`` of the OOD inputs (FPR95 for tpr = 0.95)."""
    tp, fp, n_out, n_in = _roc_points(scores_in, scores_out)
    if n_out == 0 or n_in == 0:
        return math.nan
    k = int(np.searchsorted(tp / n_out, tpr - 1e-12, side="left"))
    return float(fp[min(k, fp.shape[0] - 1)] / n_in)
