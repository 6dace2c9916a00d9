"""A reference predictive given as a file, such as the public HMC reference of the NeurIPS 2021
Approximate Inference in BDL competition (Izmailov et al. 2021, ``data/cifar10/probs.csv`` in
github.com/izmailovpavel/neurips_bdl_starter_kit; a copy ships in ``bnn_bench/references/``).

``eval.reference=<file>`` with ``eval.reference_dataset=<name>`` (the ``name`` of the
``conf/dataset`` choice the file belongs to, e.g. ``cifar10``) and
``eval.reference_split=<set>`` (the evaluation set its rows are, e.g. ``test``). The file is
an (N, C) matrix of class probabilities, one row per input of that set in the dataset's
order: whitespace-separated text (``.csv``, ``.txt``, each optionally ``.gz``), ``.npy``, or
``.npz`` holding one array.

A file carries no fingerprint of its inputs, so two checks stand in for one:

- before the data are read (the dry run makes it too): the file is readable, its rows are
  probabilities, the dataset is this run's, the set is one of this run's, of N inputs and
  C classes;
- once the labels are read, before ``fit``: **the order check**. The file's argmax accuracy
  on the set's labels, ``acc``, must be far above what the same predictions would score in a
  random order, ``chance = Σ_c P(argmax = c)·P(label = c)``: ``acc > min(3·chance,
  (1 + chance)/2)`` and a one-sided binomial test of ``acc`` against ``chance`` at
  p < 1e-3. A file whose rows are in another order, or that belongs to another dataset or
  split, scores ``chance`` and is refused. (CIFAR-10's HMC reference scores 0.90 where
  chance is 0.10.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from scipy import stats

from bnn_bench.errors import UserError

SUFFIXES = (".csv", ".csv.gz", ".txt", ".txt.gz", ".npy", ".npz")
REFERENCES = Path(__file__).resolve().parent.parent / "references"  # the vendored files
SUM_TOLERANCE = 1e-3  # rows must sum to 1 within this (the competition's: within 3e-7)
P_VALUE = 1e-3  # the order check's binomial test


def vendored(name: str) -> str:
    """The path of a reference file that ships with bnn-bench (``bnn_bench/references/``);
    the presets name it as ``${bnn_bench.reference:<name>}``."""
    path = REFERENCES / name
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in REFERENCES.glob("*") if p.suffix != ".md"))
        raise UserError(f"No vendored reference {name!r} in {REFERENCES}; known: {known}.")
    return str(path)


if not OmegaConf.has_resolver("bnn_bench.reference"):
    OmegaConf.register_new_resolver("bnn_bench.reference", vendored)


def is_file(reference: str) -> bool:
    """Whether ``eval.reference`` names a predictive file (by its suffix) rather than a run
    folder."""
    return str(reference).lower().endswith(SUFFIXES)


def read(path: str | Path, what: str) -> np.ndarray:
    """The (N, C) float32 probabilities in a reference file, checked to be probabilities.

    Raises:
      UserError: when the file is missing, unreadable, not 2-D, or its rows are not
        probabilities (negative, not finite, or not summing to 1: e.g. logits).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: no such file. Give a predictive file ({', '.join(SUFFIXES)}).")
    try:
        probs = _load(path)
    except (ValueError, OSError, EOFError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{what}: {path} is not a readable predictive file ({first}).") from None
    if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] < 2:
        raise UserError(
            f"{what}: {path} holds an array of shape {probs.shape}; a reference is (N, C): one "
            f"row of class probabilities per input."
        )
    sums = probs.sum(-1)
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or np.abs(sums - 1).max() > SUM_TOLERANCE:
        raise UserError(
            f"{what}: {path}'s rows are not probabilities (entries {probs.min():.3g} to "
            f"{probs.max():.3g}, row sums {sums.min():.4g} to {sums.max():.4g}; they must be "
            f">= 0 and sum to 1 within {SUM_TOLERANCE}). Give probabilities, not logits or "
            f"log-probabilities."
        )
    return probs.astype(np.float32)


def _load(path: Path) -> np.ndarray:
    name = path.name.lower()
    if name.endswith(".npy"):
        return np.asarray(np.load(path, allow_pickle=False))
    if name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            if len(f.files) != 1:
                raise ValueError(f"it holds {len(f.files)} arrays ({', '.join(f.files)}), not one")
            return np.asarray(f[f.files[0]])
    return np.loadtxt(path, dtype=np.float64, ndmin=2)  # whitespace-separated; .gz unpacked


def check(
    probs: np.ndarray,
    what: str,
    dataset: str | None,
    split: str | None,
    name: str,
    num_classes: int,
    sizes: dict[str, int],
) -> None:
    """Checks a reference file against this run, before its data are read.

    Args:
      probs: (N, C) the file's probabilities.
      what: how the reference was given, for messages.
      dataset, split: ``eval.reference_dataset`` and ``eval.reference_split``.
      name: this run's dataset (``dataset.name``); num_classes: its classes.
      sizes: inputs per evaluation set of this run, by name.

    Raises:
      UserError: naming what differs.
    """
    if dataset != name:
        raise UserError(
            f"{what} belongs to dataset {dataset!r} (eval.reference_dataset), but this run's "
            f"dataset is {name!r}. Score a reference file only on the dataset it was made on."
        )
    labelled = [s for s in sizes if s != "ood"]
    if split not in labelled:
        raise UserError(
            f"eval.reference_split={split}: this run has no such labelled evaluation set (it "
            f"has {', '.join(labelled)}). Name the set the file's rows are, e.g. test."
        )
    n, c = probs.shape
    if c != num_classes or n != sizes[split]:
        raise UserError(
            f"{what} holds {n} inputs of {c} classes, but this run's {split} set has "
            f"{sizes[split]} inputs of {num_classes} classes. The file must cover the whole "
            f"{split} set in the dataset's order (no dataset.test_size, no "
            f"dataset.val_from=test for a test-set reference)."
        )


def order_check(probs: np.ndarray, labels: np.ndarray, what: str, split: str) -> dict:
    """Checks that the file's rows are the set's inputs in order (the rule: module docstring).

    Args:
      probs: (N, C) the file's probabilities; labels: (N,) the set's labels.

    Returns:
      ``{"acc": ..., "chance": ..., "p_value": ...}`` of the check.

    Raises:
      UserError: when the file's accuracy is not far above chance: misaligned, or another
        dataset's or split's.
    """
    labels = np.asarray(labels).astype(np.int64)
    pred = probs.argmax(-1)
    n, c = probs.shape
    acc = float(np.mean(pred == labels))
    chance = float(
        np.dot(np.bincount(pred, minlength=c) / n, np.bincount(labels, minlength=c)[:c] / n)
    )
    bound = min(3 * chance, (1 + chance) / 2)
    p_value = float(stats.binomtest(int(np.sum(pred == labels)), n, chance, "greater").pvalue)
    if not (acc > bound and p_value < P_VALUE):
        raise UserError(
            f"{what}: its predictions do not match the {split} labels: argmax accuracy "
            f"{acc:.3f}, where the same predictions in a random order would score "
            f"{chance:.3f} (required: above {bound:.3f}, binomial p < {P_VALUE}; here p = "
            f"{p_value:.2g}). The file is misaligned with this run's {split} set (its rows in "
            f"another order, e.g. TFDS's against the original files': try dataset.source=tfds "
            f"or local) or belongs to another dataset or split."
        )
    return {"acc": acc, "chance": chance, "p_value": p_value}


def check_file(
    settings: Any, dataset: str, num_classes: int, sizes: dict[str, int]
) -> np.ndarray | None:
    """What can be checked of a reference file before the data are read (the run and the dry
    run): readable probabilities of this dataset's set ``eval.reference_split``, of its size
    and classes. None when ``eval.reference`` is not a file.

    Args:
      settings: the ``EvalSettings``; dataset: this run's ``dataset.name``;
      num_classes: its classes; sizes: inputs per evaluation set, by name.

    Returns:
      (N, C) the file's probabilities, or None.
    """
    if settings.reference is None or not is_file(settings.reference):
        return None
    what = f"eval.reference={settings.reference}"
    probs = read(settings.reference, what)
    check(
        probs,
        what,
        settings.reference_dataset,
        settings.reference_split,
        dataset,
        num_classes,
        sizes,
    )
    return probs
