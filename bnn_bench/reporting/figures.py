"""The figures of a run, one PNG each; ``plots.write_all`` picks which a run gets.

Each function draws one figure from arrays and curves (no summaries, no config) and
returns the file it wrote; its title says what it shows, so it reads without the code.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

SHIFT_AXIS = {
    "rotate": "rotation angle (degrees)",
    "gaussian_noise": "noise std (pixels on a [0, 1] scale)",
    "contrast": "share of contrast removed",
    "invert": "blend with the negative image",
}


def _save(fig, path: Path, title: str | None = None) -> Path:
    if title is not None:  # a figure of several panels: one title over them
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _class_ticks(ax, class_names, start: int = 0) -> None:
    """Class names (shortened) as vertical x tick labels at start, start + 1, ..."""
    ax.set_xticks(
        np.arange(start, start + len(class_names)), shorten(class_names, 8), rotation=90, fontsize=7
    )


def _show(ax, image: np.ndarray) -> None:
    """A uint8 image (H, W, C) without axes; grey images in grey."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


def shorten(names, width: int = 10) -> list[str]:
    """Each name cut to ``width`` characters, a cut one ending in ``.``."""
    return [n if len(n) <= width else n[: width - 1] + "." for n in names]


def reliability_diagram(path: Path, bins: dict, title: str) -> Path:
    """Reliability diagram (accuracy per confidence bin vs the diagonal) above a
    confidence histogram, as in the laplax tutorial."""
    edges = np.asarray(bins["edges"])
    width = np.diff(edges)
    centers = edges[:-1] + width / 2
    count = np.asarray(bins["count"])
    acc, conf = np.asarray(bins["accuracy"]), np.asarray(bins["confidence"])
    fig, (ax, hx) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    filled = count > 0
    ax.bar(
        centers[filled],
        acc[filled],
        width=width[filled],
        edgecolor="black",
        color="tab:blue",
        label="accuracy in bin",
    )
    # hatched only, so the gap stays visible where it lies inside an accuracy bar
    ax.bar(
        centers[filled],
        (conf - acc)[filled],
        bottom=acc[filled],
        width=width[filled],
        fill=False,
        edgecolor="tab:red",
        hatch="///",
        linewidth=0.8,
        label="gap to the bin's mean confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left")
    hx.bar(centers, count / max(count.sum(), 1), width=width, edgecolor="black", color="gray")
    hx.set_xlabel("confidence (max predicted probability)")
    hx.set_ylabel("share of inputs")
    hx.set_xlim(0, 1)
    fig.tight_layout()
    return _save(fig, path)


def accuracy_vs_threshold(path: Path, curve: dict, title: str) -> Path:
    """Accuracy of the kept predictions and share dropped against a confidence
    threshold (BlackJAX SGLD tutorial)."""
    t = np.asarray(curve["threshold"])
    acc = 100 * np.asarray(curve["accuracy"], dtype=float)
    dropped = 100 * (1 - np.asarray(curve["kept"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, acc, "o-", color="tab:blue", label="accuracy of kept predictions")
    ax.set_xlabel("confidence threshold (predictions below it are dropped)")
    ax.set_ylabel("accuracy of kept predictions (%)", color="tab:blue")
    lo = np.nanmin(acc) if np.isfinite(acc).any() else 0
    ax.set_ylim(max(0, lo - 5), 100.5)
    bx = ax.twinx()
    bx.plot(t, dropped, "s--", color="tab:orange", label="inputs dropped")
    bx.set_ylabel("inputs dropped (%)", color="tab:orange")
    bx.set_ylim(0, 100)
    lines = ax.get_lines() + bx.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center left")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def risk_coverage(path: Path, curve: dict, aurc: float, title: str) -> Path:
    """Selective risk against coverage, most confident inputs first."""
    cov = 100 * np.asarray(curve["coverage"])
    risk = 100 * np.asarray(curve["risk"])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(cov, risk, color="tab:blue", label=f"model (AURC {100 * aurc:.2f}%)")
    ax.axvline(80, color="gray", ls=":", label="80% coverage")
    ax.axhline(5, color="gray", ls="--", label="5% risk")
    ax.set_xlabel("coverage: share of inputs accepted, most confident first (%)")
    ax.set_ylabel("risk: error rate on accepted inputs (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, max(10, float(np.ceil(risk.max() + 1))))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def uncertain_images(
    path: Path, images: np.ndarray, labels, preds, conf, entropy, class_names, title: str
) -> Path:
    """A grid of the most uncertain test images (highest predictive entropy) with
    their true and predicted labels; wrong predictions in red."""
    n = len(images)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 3.3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        _show(ax, images[i])
        color = "tab:green" if labels[i] == preds[i] else "tab:red"
        ax.set_title(
            f"true: {class_names[labels[i]]}\npred: {class_names[preds[i]]} "
            f"(p={conf[i]:.2f})\nentropy {entropy[i]:.2f}",
            fontsize=8,
            color=color,
        )
    return _save(fig, path, title)


def uncertain_per_class(path: Path, curve: dict, class_names, title: str) -> Path:
    """Uncertain predictions (confidence below a threshold) per true class."""
    count = np.asarray(curve["count"])
    total = np.maximum(np.asarray(curve["total"]), 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(count))
    bars = ax.bar(x, count, color="tab:purple")
    for b, c, t in zip(bars, count, total, strict=True):
        ax.annotate(
            f"{100 * c / t:.1f}%",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(x, shorten(class_names, 12), rotation=30, ha="right")
    ax.set_xlabel("true class")
    ax.set_ylabel(f"inputs with confidence < {curve['below']:g}")
    ax.set_ylim(0, max(1, count.max()) * 1.15)
    ax.set_title(title + "\n(labels above the bars: share of the class)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def member_boxplots(
    path: Path, images: np.ndarray, kept: np.ndarray, labels, idx, class_names, title: str
) -> Path:
    """Box plots of the members' class probabilities for a few fixed test images
    (JaxSGMC CIFAR-10 tutorial), each under its image."""
    k = kept.shape[1]
    fig, axes = plt.subplots(
        2, k, figsize=(3.0 * k, 5.6), squeeze=False, gridspec_kw={"height_ratios": [1, 1.6]}
    )
    for j in range(k):
        _show(axes[0, j], images[j])
        axes[0, j].set_title(f"test #{int(idx[j])}\ntrue: {class_names[labels[j]]}", fontsize=9)
        ax = axes[1, j]
        ax.boxplot(kept[:, j, :], showfliers=True, widths=0.6, flierprops={"markersize": 2})
        _class_ticks(ax, class_names, start=1)
        ax.set_ylim(-0.02, 1.02)
        if j == 0:
            ax.set_ylabel("member's probability")
    return _save(fig, path, title)


def accuracy_over_certainty(path: Path, curve: dict, title: str) -> Path:
    """Hard-voting accuracy among inputs whose member agreement reaches each
    threshold, and the share of inputs that do (JaxSGMC)."""
    t = np.asarray(curve["threshold"])
    acc = 100 * np.asarray(curve["accuracy"], dtype=float)
    share = 100 * np.asarray(curve["share"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bx = ax.twinx()
    bars = bx.bar(t, share, width=0.06, color="lightgray", edgecolor="gray")
    bx.set_ylim(0, 100)
    bx.set_ylabel("inputs at or above the threshold (%)", color="gray")
    ax.set_zorder(bx.get_zorder() + 1)  # the line over the bars
    ax.patch.set_visible(False)
    (line,) = ax.plot(t, acc, "o-", color="tab:blue")
    ax.set_xlim(0.45, 1.05)
    ax.set_xlabel("certainty threshold (share of members voting for the majority class)")
    ax.set_ylabel("hard-vote accuracy on those inputs (%)", color="tab:blue")
    lo = np.nanmin(acc) if np.isfinite(acc).any() else 0
    ax.set_ylim(max(0, lo - 8), 100.5)
    ax.grid(alpha=0.3)
    ax.legend([line, bars], ["hard-vote accuracy", "share of inputs"], loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def member_std_extremes(
    path: Path,
    images: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    labels,
    summed_std: np.ndarray,
    n_low: int,
    class_names,
    title: str,
) -> Path:
    """Mean class probabilities with ±1 std over members (the error bars of capsa's vote
    wrapper) for the test images whose summed member std Σ_c std_s[p_s(c | x)] is lowest
    (top row) and highest (bottom row).

    Args:
      images: (n, H, W, C) uint8; the first ``n_low`` are the lowest.
      mean, std: (n, C) mean and std over members of each class probability.
      summed_std: (n,) std summed over classes.
    """
    n = len(images)
    fig, axes = plt.subplots(
        2,
        2 * (n // 2),
        figsize=(3.2 * n, 5.2),
        squeeze=False,
        gridspec_kw={"width_ratios": [1, 2.2] * (n // 2)},
    )
    for i in range(n):
        row, col = divmod(i, n // 2)
        _show(axes[row, 2 * col], images[i])
        kind = "lowest" if i < n_low else "highest"
        axes[row, 2 * col].set_title(f"{kind} Σ std\n{summed_std[i]:.3g}", fontsize=8)
        ax = axes[row, 2 * col + 1]
        colors = ["tab:green" if c == labels[i] else "tab:gray" for c in range(mean.shape[1])]
        ax.bar(
            np.arange(mean.shape[1]),
            mean[i],
            yerr=std[i],
            color=colors,
            capsize=2,
            error_kw={"elinewidth": 1},
        )
        ax.set_ylim(0, 1.05)
        _class_ticks(ax, class_names)
        ax.set_title(f"true: {class_names[labels[i]]} (green)", fontsize=8)
        if col == 0:
            ax.set_ylabel("probability ± std")
    return _save(fig, path, title)


def traces(path: Path, draws: np.ndarray, rhat: float, ess: float, title: str) -> Path:
    """Per-chain traces of the test log-likelihood of each accepted sample.

    Args:
      draws: (chains, S, Q) per-sample quantities; quantity 0 is the test log-likelihood.
      rhat, ess: the run's ``test/rhat`` and ``test/ess`` (bulk ESS; NaN: not defined), for
        the title.
    """
    chains, s = draws.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for c in range(chains):
        ax.plot(np.arange(1, s + 1), draws[c, :, 0], lw=1, label=f"chain {c}")
    ax.set_xlabel("accepted sample of each chain")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test log-likelihood (nats per input)")
    rhat_text = "n/a (one chain)" if np.isnan(rhat) else f"{rhat:.3f}"
    ax.set_title(
        f"{title}\nmax rank-normalised split-R̂ {rhat_text}, min bulk ESS {ess:.1f} "
        "(over all tracked quantities)",
        fontsize=9,
    )
    if chains <= 10:
        ax.legend(fontsize=7, ncol=min(chains, 5))
    return _save(fig, path)


def shift_curves(path: Path, shift: dict, title: str) -> Path:
    """Accuracy, NLL and ECE against corruption intensity, one row per corruption."""
    names = list(shift)
    fig, axes = plt.subplots(len(names), 3, figsize=(12, 3.2 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        c = shift[name]
        level = np.asarray(c["level"])
        for j, (key, label, scale) in enumerate(
            (("acc", "accuracy (%)", 100), ("nll", "NLL (nats)", 1), ("ece", "ECE (%)", 100))
        ):
            ax = axes[r, j]
            ax.plot(level, scale * np.asarray(c[key], dtype=float), "o-")
            ax.set_xlabel(
                SHIFT_AXIS.get(
                    name, "CIFAR-10-C severity" if name.startswith("cifar10c_") else "intensity"
                )
            )
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.set_title(f"{name}: {label.split(' (')[0]}", fontsize=9)
            if key == "acc":
                ax.set_ylim(0, 100)
    fig.suptitle(title + " — level 0 is the clean test set", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def ood_histograms(
    path: Path,
    scores: dict[str, tuple[np.ndarray, np.ndarray]],
    aurocs: dict[str, float],
    title: str,
) -> Path:
    """Histograms of each OOD score on the test set and on the OOD set."""
    fig, axes = plt.subplots(1, len(scores), figsize=(4.5 * len(scores), 3.6), squeeze=False)
    for ax, (name, (s_in, s_out)) in zip(axes[0], scores.items(), strict=True):
        lo, hi = min(s_in.min(), s_out.min()), max(s_in.max(), s_out.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 40)
        ax.hist(s_in, bins=bins, alpha=0.6, density=True, label="test (in-distribution)")
        ax.hist(s_out, bins=bins, alpha=0.6, density=True, label="OOD")
        auroc = aurocs.get(name, float("nan"))
        ax.set_title(f"{name} (AUROC {100 * auroc:.1f}%)", fontsize=9)
        ax.set_xlabel(name if name == "max prob" else f"{name} (nats)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    return _save(fig, path, title)
