"""Metrics as plain functions of predictive probabilities (N, C) and labels (N,).

Conventions (as TorchUncertainty): accuracy in [0, 1]; NLL in nats, averaged over
inputs; Brier score summed over classes and averaged over inputs (in [0, 2]);
ECE top-label with ``num_bins`` equal-width bins over (0, 1], weighted by bin size.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_TINY = 1e-12


def accuracy(probs, labels) -> float:
    """Share of inputs whose most probable class is the label."""
    return float(jnp.mean(jnp.argmax(probs, -1) == labels))


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the labels (nats)."""
    p = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    return float(-jnp.mean(jnp.log(jnp.clip(p, _TINY))))


def brier(probs, labels) -> float:
    """Mean over inputs of the squared error to the one-hot label, summed over classes."""
    onehot = jnp.eye(probs.shape[-1], dtype=probs.dtype)[labels]
    return float(jnp.mean(jnp.sum(jnp.square(probs - onehot), axis=-1)))


def calibration_bins(probs, labels, num_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability over ``num_bins`` equal-width confidence bins.

    Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; a confidence of
    exactly 0 falls in bin 0.

    Returns:
      ``count`` (num_bins,), ``confidence`` and ``accuracy`` (num_bins,) means per bin
      (0 where a bin is empty), and ``edges`` (num_bins + 1,).
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
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
    """Expected calibration error: sum_b |B_b|/N · |acc(B_b) - conf(B_b)|."""
    bins = calibration_bins(probs, labels, num_bins)
    n = bins["count"].sum()
    return float(np.sum(bins["count"] / n * np.abs(bins["accuracy"] - bins["confidence"])))
