"""The figures of a regression run (``plots/calibration.png``, ``plots/predictive.png``),
one PNG each, drawn from arrays; titles say what they show."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnn_bench.reporting.figures import _save, plt


def calibration(path: Path, curves: dict[str, dict], title: str) -> Path:
    """Observed against expected coverage of the central predictive intervals, one line per
    evaluation set; the diagonal is a calibrated predictive, below it an overconfident one.

    Args:
      curves: set name -> ``{"expected": [...], "observed": [...]}``.
    """
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    for name, c in curves.items():
        ax.plot(c["expected"], c["observed"], "o-", ms=3, label=f"{name} set")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("expected coverage (level of the central interval)")
    ax.set_ylabel("observed coverage (share of targets inside)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def predictive(
    path: Path,
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    bands: dict[str, tuple[np.ndarray, np.ndarray]],
    title: str,
) -> Path:
    """A 1-D predictive: the data as dots, and each predictive's mean with a ±2σ band.

    Args:
      data: label -> (x, y) points (e.g. ``train``, ``test``).
      x: (N,) the inputs the predictives are given at (original units).
      bands: label -> (mean, std), each (N,): the run's (drawn first, filled) and, with a
        reference, the reference's (drawn as lines).
    """
    order = np.argsort(x, kind="stable")
    xs = x[order]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    # training points on top and larger: they say where the posterior has data
    markers = {"train": ("tab:orange", 16, 0.9, 4), "test": ("black", 6, 0.4, 3)}
    for label, (px, py) in data.items():
        color, size, alpha, z = markers.get(label, ("tab:green", 8, 0.6, 3))
        ax.scatter(px, py, s=size, color=color, alpha=alpha, label=f"{label} data", zorder=z)
    colors = ["tab:blue", "tab:red", "tab:orange", "tab:purple"]
    for i, (label, (mean, std)) in enumerate(bands.items()):
        m, s, color = mean[order], std[order], colors[i % len(colors)]
        ax.plot(xs, m, color=color, lw=1.5, label=f"{label}: mean")
        if i == 0:
            ax.fill_between(xs, m - 2 * s, m + 2 * s, color=color, alpha=0.25, label="±2σ")
        else:
            ax.plot(xs, m - 2 * s, color=color, lw=1, ls="--", label=f"{label}: ±2σ")
            ax.plot(xs, m + 2 * s, color=color, lw=1, ls="--")
    ax.set_xlabel("x")
    ax.set_ylabel("y (original units)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
