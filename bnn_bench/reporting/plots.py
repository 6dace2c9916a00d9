"""Plots as PNG files in the run folder's ``plots/``; each reads without the code."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def reliability_diagram(path: Path, bins: dict, title: str) -> Path:
    """Reliability diagram (accuracy per confidence bin vs the diagonal) above a
    confidence histogram, as in the laplax tutorial."""
    edges = np.asarray(bins["edges"])
    width = np.diff(edges)
    centers = edges[:-1] + width / 2
    count = np.asarray(bins["count"])
    acc, conf = np.asarray(bins["accuracy"]), np.asarray(bins["confidence"])
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    filled = count > 0
    ax.bar(centers[filled], acc[filled], width=width[filled], edgecolor="black",
           color="tab:blue", label="accuracy")
    ax.bar(centers[filled], (conf - acc)[filled], bottom=acc[filled], width=width[filled],
           edgecolor="tab:red", color="tab:red", alpha=0.3, hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    hx.bar(centers, count / max(count.sum(), 1), width=width, edgecolor="black", color="gray")
    hx.set_xlabel("confidence (max predicted probability)")
    hx.set_ylabel("share of inputs")
    hx.set_xlim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
