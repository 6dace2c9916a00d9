"""The ``eval`` config group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from bnn_bench.errors import UserError
from bnn_bench.evaluation.reference_file import is_file
from bnn_bench.evaluation.shift import (
    CIFAR10_C,
    CIFAR10_C_LEVELS,
    CORRUPTIONS,
    DEFAULT_LEVELS,
    TFDS_PREFIX,
    is_tfds,
)


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


@dataclass(frozen=True)
class EvalSettings:
    """How runs are evaluated.

    Attributes:
      batch_size: inputs per forward pass when predicting.
      num_bins: bins of ECE, adaptive ECE, MCE and the reliability diagram.
      keep_inputs: the first this-many inputs of each set keep every member's
        probabilities (for per-image box plots).
      keep_members: at most this many members are kept for them; a regression run keeps
        this many members on every input (its mixture's NLL, CRPS and intervals use them).
      uncertain_below: a prediction whose confidence (max posterior-predictive
        probability) is below this counts as uncertain.
      ood_dataset: a dataset config (any ``conf/dataset`` choice, chosen with
        ``dataset@eval.ood_dataset=NAME``) whose test split is the OOD set, or None.
      shift: corruptions of the test set (``rotate``, ``gaussian_noise``,
        ``contrast``, ``invert``), or CIFAR-10-C sets from TFDS
        (``cifar10c_<name>``, severities 1..5); each level is an evaluation set.
      shift_levels: intensities per corruption (0 would be the clean test set).
      tfds_data_dir: where prepared CIFAR-10-C lives (default ``TFDS_DATA_DIR``).
      download: let TFDS download CIFAR-10-C when it is not prepared.
      shift_size: corrupt only the first this-many test inputs (None: all).
      shift_seed: seed of the noise corruptions; fixed, so every run and method
        sees the same corrupted images.
      plots: write the plots into ``plots/``.
      reference: a finished run's folder whose posterior predictive this run is scored
        against (``<set>/agreement``, ``<set>/total_variation``; regression:
        ``<set>/w2``, ``<set>/mean_error``, ``<set>/std_error``; e.g. a ``method=hmc``
        run), or a predictive file (``reference_file``: the competition's ``probs.csv``,
        ``.npy``, ``.npz``), or None. Its data must be this run's: checked before ``fit``.
      reference_dataset: for a reference file only: the dataset it belongs to (the
        ``name`` of a ``conf/dataset`` choice, e.g. ``cifar10``); refused otherwise.
      reference_split: for a reference file only: the evaluation set its rows are
        (``test``, ``val``); refused otherwise.
    """

    batch_size: int = 1000
    num_bins: int = 15
    keep_inputs: int = 5
    keep_members: int = 1000
    uncertain_below: float = 0.5
    ood_dataset: Any = None
    shift: Sequence[str] = ()
    shift_levels: Mapping[str, Sequence[float]] = field(default_factory=lambda: DEFAULT_LEVELS)
    shift_size: int | None = None
    shift_seed: int = 0
    tfds_data_dir: str | None = None
    download: bool = False
    plots: bool = True
    reference: str | None = None
    reference_dataset: str | None = None
    reference_split: str | None = None

    def __post_init__(self):
        if (
            self.batch_size < 1
            or self.num_bins < 1
            or self.keep_inputs < 0
            or self.keep_members < 0
        ):
            raise UserError(
                "eval.batch_size and eval.num_bins must be >= 1, "
                "eval.keep_inputs and eval.keep_members >= 0."
            )
        if not 0.0 < self.uncertain_below <= 1.0:
            raise UserError(f"eval.uncertain_below must be in (0, 1]; got {self.uncertain_below}.")
        if self.ood_dataset is not None and not (
            isinstance(self.ood_dataset, Mapping) and "_target_" in self.ood_dataset
        ):
            raise UserError(
                f"eval.ood_dataset must be a dataset config, got {self.ood_dataset!r}. "
                "Choose one with dataset@eval.ood_dataset=NAME (e.g. "
                "dataset@eval.ood_dataset=mnist), then override its keys as "
                "eval.ood_dataset.KEY=VALUE."
            )
        self._check_reference()
        if self.shift_size is not None and self.shift_size < 1:
            raise UserError(f"eval.shift_size must be >= 1 or null; got {self.shift_size}.")
        shift, levels = self._checked_shift()
        object.__setattr__(self, "shift", tuple(shift))
        object.__setattr__(
            self, "shift_levels", {k: tuple(float(v) for v in vs) for k, vs in levels.items()}
        )

    def _check_reference(self) -> None:
        """A file needs its dataset and set; a run folder or no reference takes neither."""
        if self.reference is not None and not isinstance(self.reference, str):
            raise UserError(
                f"eval.reference must be a run folder or a predictive file (a path) or null; "
                f"got {self.reference!r}."
            )
        keys = {
            "eval.reference_dataset": self.reference_dataset,
            "eval.reference_split": self.reference_split,
        }
        given = [k for k, v in keys.items() if v is not None]
        if self.reference is not None and is_file(self.reference):
            missing = [k for k in keys if k not in given]
            if missing:
                raise UserError(
                    f"eval.reference={self.reference} is a predictive file: give "
                    f"{' and '.join(missing)} (the dataset and evaluation set its rows are, "
                    f"e.g. eval.reference_dataset=cifar10 eval.reference_split=test)."
                )
        elif given:
            what = "is a run folder" if self.reference is not None else "is not set"
            raise UserError(
                f"{', '.join(given)}: only a reference file "
                f"takes them, and eval.reference {what} (a run folder's fingerprints say what "
                f"data it belongs to). Drop them."
            )

    def _checked_shift(self) -> tuple[list[str], dict]:
        """The corruptions as a list and the levels of every known one, checked."""
        shift = _plain(self.shift)
        shift = [shift] if isinstance(shift, str) else list(shift or ())
        levels = {**DEFAULT_LEVELS, **(_plain(self.shift_levels) or {})}
        for name in shift:
            if is_tfds(name) and name[len(TFDS_PREFIX) :] in CIFAR10_C:
                levels.setdefault(name, CIFAR10_C_LEVELS)
            elif name not in CORRUPTIONS:
                raise UserError(
                    f"eval.shift: unknown corruption {name!r}. Known: "
                    f"{', '.join(CORRUPTIONS)}, or {TFDS_PREFIX}<name> with <name> "
                    f"one of CIFAR-10-C's: {', '.join(CIFAR10_C)}."
                )
            lv = levels[name]
            if (
                not isinstance(lv, list | tuple)
                or not lv
                or not all(isinstance(v, int | float) and v > 0 for v in lv)
            ):
                raise UserError(
                    f"eval.shift_levels.{name} must be a non-empty list of positive "
                    f"intensities (0 is the clean test set); got {lv!r}."
                )
        if len(set(shift)) != len(shift):
            raise UserError(f"eval.shift lists a corruption twice: {shift}.")
        return shift, levels

    def shift_sets(self) -> list[tuple[str, float]]:
        """(corruption, level) of every shifted evaluation set, in config order."""
        return [(name, level) for name in self.shift for level in self.shift_levels[name]]
