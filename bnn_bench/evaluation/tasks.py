"""What a run evaluates, by the task its dataset implies: the one place that branches on it.

``task_of(data, settings)`` returns ``Classification`` or ``Regression`` (``Spec.task``).
Both have the same role in ``run.py``: the summary type the methods fold members into
(``summary``, handed to ``EvalInputs``), the fingerprints and the reference (``eval.reference``)
read before ``fit``, then the metrics and curves, the ``predictive/`` files, the fidelity
to the reference, and the plots. Classification delegates to the modules it always used;
regression (``regression``, ``regression_summary``, ``regression_fidelity``) works on the
members' Gaussians in the target's original units.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation import evaluate as classification_evaluate
from bnn_bench.evaluation import fidelity
from bnn_bench.evaluation import regression as R
from bnn_bench.evaluation import regression_fidelity as RF
from bnn_bench.evaluation.diagnostics import chain_metrics
from bnn_bench.evaluation.regression_summary import RegressionSummary
from bnn_bench.evaluation.sets import labels_of
from bnn_bench.evaluation.settings import EvalSettings
from bnn_bench.evaluation.summary import PredictiveSummary
from bnn_bench.reporting import plots
from bnn_bench.reporting import regression_figures as RFig
from bnn_bench.reporting.figures import traces

log = logging.getLogger(__name__)

Metrics = dict[str, float]


def task_of(data: Dataset, settings: EvalSettings) -> Classification | Regression:
    """The evaluation of the task ``data.spec.task`` implies (classification when the spec
    has no task)."""
    if getattr(data.spec, "task", "classification") == "regression":
        return Regression(data, settings)
    return Classification(data, settings)


@dataclass(frozen=True)
class Classification:
    """Evaluation of class probabilities: what ``run.py`` always did (``evaluation.evaluate``,
    ``fidelity``, ``plots.write_all``)."""

    data: Dataset
    settings: EvalSettings
    summary: ClassVar[type] = PredictiveSummary

    def fingerprints(self, sets: dict[str, Split]) -> dict:
        return fidelity.fingerprints(self.data, sets)

    def reference(self, prints: dict, sets: dict[str, Split]) -> fidelity.Reference | None:
        return fidelity.Reference.load(self.settings, prints, labels_of(sets))

    def evaluate(self, summaries: dict, sets: dict[str, Split]) -> tuple[Metrics, dict]:
        s = self.settings
        return classification_evaluate(summaries, labels_of(sets), s.num_bins, s.uncertain_below)

    def write_predictive(self, out_dir: Path, summaries: dict, prints: dict) -> Path:
        return fidelity.write_predictive(out_dir, summaries, prints)

    def fidelity(self, reference, summaries: dict) -> Metrics:
        return reference.metrics(summaries) if reference is not None else {}

    def plots(self, folder, title, summaries, sets, metrics, curves, reference) -> dict[str, Path]:
        del reference
        return plots.write_all(folder, title, summaries, sets, metrics, curves, self.data.spec)


@dataclass(frozen=True)
class Regression:
    """Evaluation of a Gaussian mixture per input, in the target's original units: RMSE,
    NLL, CRPS, coverage and width of central intervals, the calibration curve, and against a
    reference the competition's W2 and the mean and std errors."""

    data: Dataset
    settings: EvalSettings
    summary: ClassVar[type] = RegressionSummary

    def __post_init__(self):
        if self.settings.shift or self.settings.ood_dataset is not None:
            raise UserError(
                f"eval.shift and eval.ood_dataset corrupt or replace images; dataset "
                f"{self.data.spec.name} is a regression dataset. Drop them "
                f"(eval.shift=[] eval.ood_dataset=null)."
            )

    @property
    def target(self) -> tuple[float, float]:
        """(mean, std) that map standardised targets back: y = mean + std · z."""
        spec = self.data.spec
        return float(getattr(spec, "target_mean", 0.0)), float(getattr(spec, "target_std", 1.0))

    def original(self, summary: RegressionSummary) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sd), each (S, N), of the kept members in original units."""
        if summary.kept() == 0:
            raise UserError(
                "eval.keep_members=0 keeps no member, and a regression predictive (a mixture "
                "of the members' Gaussians) needs them. Set eval.keep_members >= 1."
            )
        return R.to_original(summary.member_outputs(), *self.target)

    def targets(self, split: Split) -> np.ndarray:
        mean, std = self.target
        return mean + std * np.asarray(split.y, np.float64)

    def fingerprints(self, sets: dict[str, Split]) -> dict:
        return RF.fingerprints(fidelity.fingerprints(self.data, sets), *self.target)

    def reference(self, prints: dict, sets: dict[str, Split]) -> RF.RegressionReference | None:
        del sets  # a regression reference is a run folder; its fingerprints carry the data
        return RF.RegressionReference.load(self.settings.reference, prints)

    def evaluate(self, summaries: dict, sets: dict[str, Split]) -> tuple[Metrics, dict]:
        """``<set>/<metric>`` of every set (``regression.regression_metrics``, ``members``,
        and a sampler's ``rhat``, ``ess``, ``ess_tail``) and its calibration curve."""
        metrics: Metrics = {}
        curves: dict = {}
        for name, summary in summaries.items():
            if float(summary.count) > summary.capacity:
                log.warning(
                    "%s: %d members, but eval.keep_members=%d: the regression metrics use "
                    "the first %d. Raise eval.keep_members to use all.",
                    name,
                    int(summary.count),
                    summary.capacity,
                    summary.capacity,
                )
            mu, sd = self.original(summary)
            y = self.targets(sets[name])
            out = {"members": float(summary.count), **R.regression_metrics(mu, sd, y)}
            if summary.trace is not None:  # a sampler's chains: split-R̂ and ESS
                out |= chain_metrics(summary.trace.draws())
            metrics |= {f"{name}/{k}": v for k, v in out.items()}
            curves[name] = {"calibration": R.calibration_curve(mu, sd, y)}
        return metrics, curves

    def _originals(self, summaries: dict, names) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {name: self.original(summaries[name]) for name in names}

    def write_predictive(self, out_dir: Path, summaries: dict, prints: dict) -> Path:
        return RF.write_predictive(out_dir, self._originals(summaries, prints["sets"]), prints)

    def fidelity(self, reference, summaries: dict) -> Metrics:
        if reference is None:
            return {}
        return reference.metrics(self._originals(summaries, reference.sets))

    def plots(self, folder, title, summaries, sets, metrics, curves, reference) -> dict[str, Path]:
        """``calibration.png``; ``predictive.png`` for 1-D inputs (with the reference's
        bands when there is one); a sampler's ``traces.png``."""
        folder = Path(folder)
        test = summaries["test"]
        m = lambda k: metrics.get(f"test/{k}", float("nan"))  # noqa: E731
        head = f"{title} · S = {int(test.count)}"
        out = {
            "calibration": RFig.calibration(
                folder / "calibration.png",
                {name: c["calibration"] for name, c in curves.items() if "calibration" in c},
                f"{head}\ncentral-interval coverage; test: 95% interval covers "
                f"{100 * m('coverage_95'):.1f}%, RMSE {m('rmse'):.3g}, NLL {m('nll'):.3g}",
            )
        }
        x = np.asarray(sets["test"].x)
        if x.ndim == 1 or (x.ndim == 2 and x.shape[1] == 1):
            out["predictive"] = self._predictive(folder, head, summaries, sets, reference)
        if test.trace is not None and test.trace.draws().shape[1] > 0:
            out["traces"] = traces(
                folder / "traces.png",
                test.trace.draws(),
                m("rhat"),
                m("ess"),
                f"{title}: per-chain traces of the test log-likelihood",
            )
        return out

    def inputs(self, split: Split) -> np.ndarray:
        """(N,) one feature in its original units (``Spec.mean``, ``Spec.std``: the training
        split's feature mean and std the loader standardised with)."""
        spec = self.data.spec
        mean, std = float(spec.mean[0]), float(spec.std[0])
        return mean + std * np.asarray(split.x, np.float64).reshape(-1)

    def _predictive(self, folder: Path, head: str, summaries, sets, reference) -> Path:
        x = self.inputs(sets["test"])
        train = self.data.train
        points = {
            "train": (self.inputs(train), self.targets(train)),
            "test": (x, self.targets(sets["test"])),
        }
        bands = {"this run": R.moments(*self.original(summaries["test"]))}
        if reference is not None and "test" in reference.sets:
            bands["reference"] = R.moments(*reference.members["test"])
        return RFig.predictive(
            folder / "predictive.png",
            points,
            x,
            bands,
            f"{head}\npredictive mean and ±2σ (the mixture's std) on the test inputs",
        )
