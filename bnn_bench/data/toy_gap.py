"""A 1-D regression with a gap between two clusters of inputs, for the picture of
"in-between" uncertainty (Foong et al. 2019, "'In-Between' Uncertainty in Bayesian Neural
Networks"): which methods grow their predictive uncertainty in the gap, as HMC does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np

from bnn_bench.data.dataset import Dataset, Located, Spec, to_device
from bnn_bench.errors import UserError
from bnn_bench.schema import NonNegative, Positive


def gap_function(x: np.ndarray) -> np.ndarray:
    """The noiseless target, cos(4x + 0.8): Foong et al.'s 1-D cosine dataset."""
    return np.cos(4.0 * x + 0.8)


@dataclass(frozen=True)
class ToyGapDataset:
    """Foong et al.'s 1-D data: half the training inputs uniform on ``left``, half on
    ``right``, targets cos(4x + 0.8) + N(0, ``noise``²). Their generator (the
    ``1d_cosine_separated`` data): 100 points, U[-1, -0.7] and U[0.5, 1], noise variance
    0.01. Validation: more draws from the same two clusters. Test: ``test_size`` inputs
    evenly on ``grid`` (across the gap and beyond both clusters), with noisy targets, so
    ``plots/predictive.png`` shows the whole line.

    The data depend on ``data_seed`` only, never on the run's ``seed``. They are not
    standardised: inputs lie in [-2, 2] and targets in [-1.3, 1.3] already, and the
    noise ``noise`` is then the likelihood's σ (``likelihood.sigma``) as it is.

    Attributes:
      train_size: training inputs (half in each cluster; the odd one on the right).
      val_size: validation inputs from the same clusters (0: none).
      test_size: test inputs on the grid.
      left, right: the two clusters' input intervals.
      grid: the interval the test inputs cover.
      noise: the targets' noise standard deviation.
      data_seed: seed of the generator.
    """

    train_size: Annotated[int, Positive] = 100
    val_size: Annotated[int, NonNegative] = 20
    test_size: Annotated[int, Positive] = 200
    left: tuple[float, float] = (-1.0, -0.7)
    right: tuple[float, float] = (0.5, 1.0)
    grid: tuple[float, float] = (-2.0, 2.0)
    noise: Annotated[float, NonNegative] = 0.1
    data_seed: int = 0

    @property
    def spec(self) -> Spec:
        """One float feature, one target; in their own units (target mean 0, std 1)."""
        for name, (lo, hi) in (("left", self.left), ("right", self.right), ("grid", self.grid)):
            if not lo < hi:
                raise UserError(f"dataset.{name} must be an interval [lo, hi], lo < hi.")
        return Spec("toy_gap", (1,), 1, ("y",), (0.0,), (1.0,), task="regression")

    def _clusters(self, n: int, rng: np.random.Generator) -> np.ndarray:
        left = rng.uniform(*self.left, size=n // 2)
        right = rng.uniform(*self.right, size=n - n // 2)
        return np.concatenate([left, right])

    def arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{"train", "val", "test"}`` -> (x (n, 1), y (n,)) float32 host arrays."""
        self.spec  # noqa: B018 - checks the intervals
        rng = np.random.default_rng(self.data_seed)
        xs = {
            "train": self._clusters(self.train_size, rng),
            "val": self._clusters(self.val_size, rng),
            "test": np.linspace(*self.grid, self.test_size),
        }
        return {
            k: (
                x[:, None].astype(np.float32),
                (gap_function(x) + self.noise * rng.standard_normal(x.shape)).astype(np.float32),
            )
            for k, x in xs.items()
        }

    def load(self) -> Dataset:
        """Generates the splits (host numpy, then on the device)."""
        a = self.arrays()
        val = to_device(a["val"], "regression") if self.val_size else None
        return Dataset(
            self.spec,
            to_device(a["train"], "regression"),
            to_device(a["test"], "regression"),
            val,
            source="generated in memory",
        )

    def locate(self) -> Located:
        """The spec and split sizes without generating the data (dry runs)."""
        sizes = {"train": self.train_size, "val": self.val_size, "test": self.test_size}
        return Located(self.spec, "generated in memory", sizes)
