"""Fidelity to a reference run: agreement and total variation (Izmailov et al. 2021).

Every run keeps its posterior predictive: ``predictive/<set>.npy`` (N, C) float32
per labelled evaluation set, and ``predictive/fingerprints.json``, which holds a
fingerprint (SHA-256 of the labels and of the stored uint8 inputs, with their sizes) of
every such set and of the training split, and what the model is fed of those inputs
(``preprocess``: the scaling, per-channel normalisation and resize of ``Spec.preprocess``).
``eval.reference=<run folder>`` (or
``bnn-bench-compare --reference``) scores a run's predictive against the
reference's on the sets both runs have: ``<set>/agreement`` (share of inputs whose
top-1 class matches) and ``<set>/total_variation`` (mean ½ Σ_c |p − p_ref|).

A regression run keeps its members' Gaussians instead, (S, N, 2) per set, and is scored by
the competition's W2 and the mean and std errors (``regression_fidelity``); its
fingerprints say ``"task": "regression"``.

A reference only means something on the same inputs and for a posterior of the
same training data, so the fingerprints must match; a mismatch stops the run
before ``fit`` with a message that names the difference.

``eval.reference=<file>`` is a reference predictive given as a file instead (the
competition's ``probs.csv``), with the dataset and set it belongs to: read and checked
in ``reference_file``, which also states the order check that stands in for a fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnn_bench.data import Dataset, Spec, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.evaluation import reference_file
from bnn_bench.evaluation.summary import PredictiveSummary
from bnn_bench.reporting.outputs import write_json_atomic, write_npy_atomic
from bnn_bench.run_folder import FINGERPRINTS, METRICS, PREDICTIVE

log = logging.getLogger(__name__)


def set_filename(name: str) -> str:
    """A file name for an evaluation set: ``shift/rotate/15`` -> ``shift-rotate-15.npy``."""
    return name.replace("/", "-") + ".npy"


def _sha256(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def fingerprint(split: Split) -> dict:
    """What identifies a set: its size, image shape and the SHA-256 of its inputs and labels."""
    x, y = np.asarray(split.x), np.asarray(split.y)
    return {
        "num_inputs": int(x.shape[0]),
        "input_shape": list(x.shape[1:]),
        "inputs_sha256": _sha256(x),
        "labels_sha256": _sha256(y),
    }


def preprocessing(spec: Spec) -> dict:
    """What ``Spec.preprocess`` does to the stored uint8 images before the model sees them.

    The fingerprints hash the stored images, so two runs of the same data that feed the
    model differently (``dataset.resize``, ``mean``/``std``) must differ here.
    """
    return {
        "scale": 1.0 / 255.0,
        "mean": [float(m) for m in spec.mean],
        "std": [float(s) for s in spec.std],
        "resize": None if spec.resize is None else [int(r) for r in spec.resize],
        "input_shape": [int(d) for d in spec.input_shape],
    }


def fingerprints(data: Dataset, sets: dict[str, Split]) -> dict:
    """The fingerprints of a run: what the model is fed (``preprocessing``), whether its
    training batches were augmented (``augment``: another likelihood), the training split
    and every labelled evaluation set (all but ``ood``), each with the file its predictive
    goes to."""
    return {
        "dataset": data.spec.name,
        "num_classes": int(data.spec.num_classes),
        "preprocess": preprocessing(data.spec),
        "augment": bool(data.spec.augment),
        "train": fingerprint(data.train),
        "sets": {
            name: {**fingerprint(split), "file": set_filename(name)}
            for name, split in sets.items()
            if name != "ood"
        },
    }


def augmentation_note(augment: bool, reference: str | Path | None) -> str | None:
    """A sentence when this run and its ``eval.reference`` differ in ``dataset.augment``,
    else None.

    Augmentation changes the likelihood (the posterior is of crops and flips of the
    training images), so a method trained with it is scored against a reference of
    another posterior: allowed (the standard recipes augment, the public HMC reference
    of Izmailov et al. 2021 does not), but said. A run folder's ``augment`` comes from
    its ``fingerprints.json`` (absent: written before augmentation existed, so none); a
    predictive file records none, and counts as made without it. A reference that
    cannot be read gives None here: ``Reference.load`` says what is wrong with it.
    """
    if reference is None:
        return None
    path = Path(reference) / PREDICTIVE / FINGERPRINTS
    theirs = False
    if Path(reference).is_dir():
        try:
            theirs = bool(json.loads(path.read_text()).get("augment", False))
        except (ValueError, OSError, AttributeError):
            return None
    if theirs == bool(augment):
        return None
    with_ = {True: "with", False: "without"}
    return (
        f"this run trains {with_[bool(augment)]} augmentation (dataset.augment="
        f"{str(bool(augment)).lower()}) and eval.reference={reference} was made "
        f"{with_[theirs]} it: agreement and total variation compare posteriors of two "
        f"different likelihoods."
    )


def write_predictive(
    out_dir: str | Path, summaries: dict[str, PredictiveSummary], prints: dict
) -> Path:
    """Writes ``predictive/<set>.npy`` (N, C) float32, the posterior-predictive mean of each
    fingerprinted set, then ``predictive/fingerprints.json``; each file atomically.

    Returns:
      The ``predictive`` folder.
    """
    folder = Path(out_dir) / PREDICTIVE
    for name, fp in prints["sets"].items():
        write_npy_atomic(folder / fp["file"], np.asarray(summaries[name].mean(), np.float32))
    write_json_atomic(folder / FINGERPRINTS, prints)
    return folder


def read_predictive(run_dir: str | Path, what: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The fingerprints and the predictive (N, C) of every set of a finished run.

    Args:
      run_dir: the run folder.
      what: how the folder was given, for messages (e.g. ``eval.reference=<dir>``).

    Raises:
      UserError: when the folder, its fingerprints or a predictive file is missing.
    """
    run_dir = Path(run_dir)
    path = run_dir / PREDICTIVE / FINGERPRINTS
    if not run_dir.is_dir():
        raise UserError(f"{what}: no such run folder. Give the folder of a finished run.")
    if not (run_dir / METRICS).is_file():
        raise UserError(
            f"{what}: {run_dir} holds no metrics.json; the run has not finished. Give the "
            f"folder of a finished run."
        )
    if not path.is_file():
        raise UserError(
            f"{what}: {path} is missing, so the run's predictive is unknown (runs older "
            f"than predictive/ do not have it). Rerun the reference with this version."
        )
    prints = _read_fingerprints(path, what)
    probs = {}
    for name, fp in prints["sets"].items():
        file = run_dir / PREDICTIVE / fp["file"]
        if not file.is_file():
            raise UserError(f"{what}: {file} (the predictive of set {name}) is missing.")
        try:
            probs[name] = np.load(file, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            # numpy reads a damaged header as pickled data and suggests allow_pickle, which
            # would not help: the file is broken, so say how in our words.
            with open(file, "rb") as f:
                why = "truncated" if f.read(6) == b"\x93NUMPY" else "it has no NumPy header"
            raise UserError(
                f"{what}: {file} (the predictive of set {name}) is not a readable .npy file "
                f"({why}). {_RERUN}"
            ) from None
        if not isinstance(probs[name], np.ndarray) or not _fits(probs[name].shape, fp, prints):
            raise UserError(
                f"{what}: {file} has shape {probs[name].shape}, but its fingerprint says "
                f"{fp['num_inputs']} inputs of {prints['num_classes']} classes."
            )
    return prints, probs


def _fits(shape: tuple, fp: dict, prints: dict) -> bool:
    """Whether a stored predictive has the shape its fingerprint says: (N, C), or a
    regression run's members (S, N, 2) (``regression_fidelity``)."""
    if prints.get("task") == "regression":
        return len(shape) == 3 and shape[0] >= 1 and shape[1:] == (fp["num_inputs"], 2)
    return shape == (fp["num_inputs"], prints["num_classes"])


_RERUN = "The reference's files are damaged: rerun the reference run, or drop the reference."
_KEYS = {"dataset", "num_classes", "train", "sets"}
_SET_KEYS = {"num_inputs", "input_shape", "inputs_sha256", "labels_sha256", "file"}


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _read_fingerprints(path: Path, what: str) -> dict:
    """``fingerprints.json``, checked to hold what ``fingerprints`` writes.

    Raises:
      UserError: naming the file when it is not JSON or lacks a field.
    """
    try:
        prints = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise UserError(
            f"{what}: {path} is not readable JSON ({_first_line(e)}). {_RERUN}"
        ) from None
    try:
        fps = [prints["train"], *prints["sets"].values()]
        ok = all(set(fp) >= _SET_KEYS for fp in fps[1:]) and set(fps[0]) >= _SET_KEYS - {"file"}
        ok = ok and set(prints) >= _KEYS
    except (TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"{what}: {path} lacks the fields bnn-bench writes. {_RERUN}")
    return prints


def _difference(mine: dict, ref: dict) -> str | None:
    """How two fingerprints differ, in words, or None if they match."""
    if mine["input_shape"] != ref["input_shape"]:
        return f"images of shape {mine['input_shape']} against {ref['input_shape']}"
    if mine["num_inputs"] != ref["num_inputs"]:
        return f"{mine['num_inputs']} inputs against {ref['num_inputs']}"
    parts = [p for p in ("inputs", "labels") if mine[f"{p}_sha256"] != ref[f"{p}_sha256"]]
    if parts:
        return f"as many inputs ({mine['num_inputs']}), but different {' and '.join(parts)}"
    return None


def _preprocess_difference(mine: dict | None, ref: dict | None) -> str | None:
    """How two runs' preprocessing differs, in words, or None if it matches."""
    for who, p in (("this run's", mine), ("the reference's", ref)):
        if p is None:
            return (
                f"{who} fingerprints.json does not record what the model sees (written by an "
                f"older bnn-bench, before resize and normalisation were fingerprinted; rerun it)"
            )
    parts = []
    if mine["input_shape"] != ref["input_shape"]:
        resize = [json.dumps(p["resize"]).replace(" ", "") for p in (mine, ref)]
        parts.append(
            f"images of shape {mine['input_shape']} (dataset.resize={resize[0]}) against "
            f"{ref['input_shape']} (dataset.resize={resize[1]})"
        )
    for key in ("mean", "std", "scale"):
        if mine[key] != ref[key]:
            parts.append(f"{key} {mine[key]} against {ref[key]}")
    return "; ".join(parts) or None


def shared_sets(prints: dict, ref: dict, what: str) -> list[str]:
    """The labelled sets two runs share, after checking that they are comparable.

    Args:
      prints: this run's fingerprints; ref: the reference's.
      what: how the reference was given, for messages.

    Raises:
      UserError: naming the difference when the runs differ in their classes, their
        training split or any shared set, in what their model sees of the images
        (resize, normalisation), or share no set.
    """
    where = f"this run ({prints['dataset']}) and the reference ({ref['dataset']})"
    fix = (
        "Score a run only against a reference with the same dataset config (the dataset, "
        "its subset sizes and its validation split), or drop the reference."
    )
    if prints["num_classes"] != ref["num_classes"]:
        raise UserError(
            f"{what}: {where} have {prints['num_classes']} and {ref['num_classes']} classes. " + fix
        )
    diff = _difference(prints["train"], ref["train"])
    if diff is not None:
        raise UserError(
            f"{what}: the training split differs between {where}: {diff} "
            f"(another dataset, subset or split). {fix}"
        )
    shared = [name for name in prints["sets"] if name in ref["sets"]]
    for name in shared:
        diff = _difference(prints["sets"][name], ref["sets"][name])
        if diff is not None:
            raise UserError(
                f"{what}: the evaluation set {name} differs between {where}: {diff} (another "
                f"dataset, subset or split). {fix}"
            )
    diff = _preprocess_difference(prints.get("preprocess"), ref.get("preprocess"))
    if diff is not None:
        raise UserError(
            f"{what}: {where} feed the model different inputs: {diff}. Score a run only "
            f"against a reference whose model sees the same inputs (the same dataset.resize, "
            f"mean and std), or drop the reference."
        )
    if not shared:
        raise UserError(
            f"{what}: {where} share no labelled evaluation set (this run: "
            f"{', '.join(prints['sets'])}; the reference: {', '.join(ref['sets'])})."
        )
    return shared


def fidelity_metrics(
    probs: dict[str, np.ndarray], reference: dict[str, np.ndarray], sets: list[str]
) -> dict[str, float]:
    """``<set>/agreement`` and ``<set>/total_variation`` of ``probs`` against ``reference``
    (set name -> (N, C) predictive) for each of ``sets``."""
    out = {}
    for name in sets:
        out[f"{name}/agreement"] = M.agreement(probs[name], reference[name])
        out[f"{name}/total_variation"] = M.total_variation(probs[name], reference[name])
    return out


@dataclass(frozen=True)
class Reference:
    """A reference predictive to score this run against (``eval.reference``): a finished
    run's, or a file's (``reference_file``).

    Attributes:
      sets: the labelled sets both have (checked to be the same data).
      probs: set name -> (N, C) float32 predictive of the reference.
    """

    sets: list[str]
    probs: dict[str, np.ndarray]

    @classmethod
    def load(cls, settings: Any, prints: dict, labels: dict[str, Any]) -> Reference | None:
        """Reads and checks ``settings.reference`` against this run's fingerprints (a run
        folder) or against its labels (a file: the order check); None if no reference is set.

        Args:
          settings: the ``EvalSettings``; prints: this run's ``fingerprints``;
          labels: set name -> (N,) labels of this run's evaluation sets.

        Raises:
          UserError: when the reference is missing or its data differ (see ``shared_sets``,
            ``reference_file``).
        """
        if settings.reference is None:
            return None
        what = f"eval.reference={settings.reference}"
        if reference_file.is_file(settings.reference):
            split = settings.reference_split
            probs = reference_file.check_file(
                settings, prints["dataset"], prints["num_classes"], _sizes(prints)
            )
            found = reference_file.order_check(probs, np.asarray(labels[split]), what, split)
            log.info(
                "%s: the %s labels match (argmax accuracy %.4f, chance %.4f)",
                what,
                split,
                found["acc"],
                found["chance"],
            )
            return cls([split], {split: probs})
        ref_prints, probs = read_predictive(settings.reference, what)
        return cls(shared_sets(prints, ref_prints, what), probs)

    def metrics(self, summaries: dict[str, PredictiveSummary]) -> dict[str, float]:
        """Agreement and total variation of this run's predictive on every shared set."""
        mine = {name: np.asarray(summaries[name].mean(), np.float32) for name in self.sets}
        return fidelity_metrics(mine, self.probs, self.sets)


def _sizes(prints: dict) -> dict[str, int]:
    return {name: fp["num_inputs"] for name, fp in prints["sets"].items()}
