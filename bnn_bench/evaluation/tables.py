"""The grouped results table at the end of the run log, laid out as TorchUncertainty's:
Classification, Calibration, Selective classification, OOD detection, Shift and
Complexity (a regression run: Regression, Central intervals, Fidelity to the reference and
Complexity). Rates are shown in %, as TorchUncertainty shows them."""

from __future__ import annotations

import math

# (group, [(metric key without the set prefix, label, shown in %)])
GROUPS = [
    (
        "Classification",
        [
            ("acc", "Acc (soft vote)", True),
            ("acc_hard", "Acc (hard vote)", True),
            ("brier", "Brier", False),
            ("nll", "NLL", False),
            ("entropy", "Entropy (total)", False),
            ("expected_entropy", "Exp. entropy (aleatoric)", False),
            ("mutual_info", "Mutual info (epistemic)", False),
            ("certainty", "Member agreement", True),
            ("members", "Members (S)", False),
        ],
    ),
    ("Calibration", [("ece", "ECE", True), ("aece", "aECE", True), ("mce", "MCE", True)]),
    (
        "Selective classification",
        [
            ("aurc", "AURC", True),
            ("augrc", "AUGRC", True),
            ("cov_at_5risk", "Cov@5Risk", True),
            ("risk_at_80cov", "Risk@80Cov", True),
        ],
    ),
]
# A regression run's groups (it has ``<set>/rmse``), in the target's units.
REGRESSION_GROUPS = [
    (
        "Regression",
        [
            ("rmse", "RMSE", False),
            ("nll", "NLL", False),
            ("crps", "CRPS", False),
            ("std", "Predictive std (mean)", False),
            ("members", "Members (S)", False),
        ],
    ),
    (
        "Central intervals",
        [(f"{k}_{p}", f"{label} {p}%", k == "coverage") for p in (50, 90, 95)
         for k, label in (("coverage", "Coverage"), ("width", "Width"))],
    ),
    (
        "Fidelity to the reference",
        [("w2", "W2 (competition)", False), ("mean_error", "Mean error", False),
         ("std_error", "Std error", False)],
    ),
]  # fmt: skip
OOD_SCORES = [("msp", "max prob"), ("entropy", "entropy"), ("mi", "mutual info")]


def _fmt(value: float | None, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if percent:
        return f"{100 * value:.2f}%"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    return f"{value:.4f}"


def _section(title: str, rows: list[tuple[str, str]], width: int) -> list[str]:
    lines = [f"┌─ {title} " + "─" * max(0, width - len(title) - 3)]
    lines += [f"│ {label:<{width - 16}}{value:>14}" for label, value in rows]
    return lines


def metrics_table(metrics: dict[str, float], split: str = "test", width: int = 48) -> str:
    """A text table of ``metrics`` (the flat ``metrics.json`` dict) for the set ``split``,
    plus the OOD, shift and complexity groups when the run has them."""
    lines: list[str] = []
    for group, items in REGRESSION_GROUPS if f"{split}/rmse" in metrics else GROUPS:
        rows = [
            (label, _fmt(metrics[f"{split}/{key}"], pct))
            for key, label, pct in items
            if f"{split}/{key}" in metrics
        ]
        if rows:
            lines += _section(f"{group} ({split})", rows, width)
    if any(k.startswith("ood/auroc") for k in metrics):
        lines.append(f"┌─ OOD detection ({split} vs ood) " + "─" * max(0, width - 30))
        lines.append(f"│ {'score':<14}{'AUROC':>10}{'AUPR':>10}{'FPR95':>10}")
        for key, label in OOD_SCORES:
            vals = [_fmt(metrics.get(f"ood/{m}_{key}"), True) for m in ("auroc", "aupr", "fpr95")]
            lines.append(f"│ {label:<14}" + "".join(f"{v:>10}" for v in vals))
    shift = sorted(
        {tuple(k.split("/")[1:3]) for k in metrics if k.startswith("shift/") and k.count("/") == 3},
        key=lambda t: (t[0], float(t[1])),
    )
    if shift:
        lines.append("┌─ Shift (corrupted test set) " + "─" * max(0, width - 29))
        lines.append(f"│ {'corruption':<16}{'level':>7}{'Acc':>9}{'NLL':>8}{'ECE':>8}")
        for name, level in shift:
            m = lambda k: metrics.get(f"shift/{name}/{level}/{k}")  # noqa: B023
            lines.append(
                f"│ {name:<16}{level:>7}{_fmt(m('acc'), True):>9}"
                f"{_fmt(m('nll'), False)[:7]:>8}{_fmt(m('ece'), True):>8}"
            )
    rows = [
        (label, _fmt(metrics[key], False))
        for key, label in (("model/params", "Parameters"), ("model/flops", "FLOPs per input (XLA)"))
        if key in metrics
    ]
    if rows:
        lines += _section("Complexity", rows, width)
    return "\n".join(lines)
