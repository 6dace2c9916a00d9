"""A small learnable image-classification set generated in memory, for tests and smoke runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np

from bnn_bench.data.dataset import (
    Dataset,
    Located,
    Spec,
    check_resize,
    split_sizes,
    split_validation,
    to_device,
)
from bnn_bench.schema import Interval, NonNegative, Positive

PositiveInt = Annotated[int, Positive]


def make_arrays(
    shape: Sequence[int],
    num_classes: int,
    size: int,
    noise: float,
    rng: np.random.Generator,
    prototypes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """``size`` images: a class prototype, randomly brightened, plus pixel noise."""
    y = rng.integers(0, num_classes, size=size).astype(np.int32)
    gain = rng.uniform(0.6, 1.0, size=(size, 1, 1, 1))
    x = prototypes[y] * gain + noise * rng.standard_normal((size, *shape))
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8), y


@dataclass(frozen=True)
class SyntheticDataset:
    """Synthetic images: each class is a smooth random pattern; samples are noisy copies.

    Learnable well above chance by every model, yet not perfectly separable at the
    default ``noise``, so calibration metrics are not degenerate. The data depend on
    ``data_seed`` only, never on the run's ``seed``.

    Attributes:
      shape: (H, W, C) of the images.
      num_classes: number of classes.
      train_size, test_size: examples per split (validation is carved from train).
      noise: standard deviation of the pixel noise, on a [0, 1] scale.
      contrast: how far the class patterns stray from grey (smaller is harder).
      data_seed: seed of the generator.
      val_from, val_fraction, resize, augment: as for ``stored.StoredDataset``.
    """

    shape: tuple[PositiveInt, PositiveInt, PositiveInt] = (28, 28, 1)
    num_classes: Annotated[int, Interval(2, None)] = 10
    train_size: Annotated[int, Positive] = 2048
    test_size: Annotated[int, Positive] = 512
    noise: Annotated[float, NonNegative] = 0.35
    contrast: float = 0.25
    data_seed: int = 0
    val_from: Literal["train", "test"] = "train"
    val_fraction: Annotated[float, Interval(0, 1, hi_open=True)] = 0.1
    resize: tuple[PositiveInt, PositiveInt] | None = None
    augment: bool = False

    @property
    def spec(self) -> Spec:
        """The generated images' spec: mid-grey mean, a fixed spread."""
        shape = tuple(int(s) for s in self.shape)
        names = tuple(f"class {i}" for i in range(self.num_classes))
        c = shape[2]
        mean, std = (0.5,) * c, (0.25,) * c
        resize = check_resize(self.resize)
        return Spec(
            "synthetic", shape, self.num_classes, names, mean, std, resize, augment=self.augment
        )

    def load(self) -> Dataset:
        """Generates the images (host numpy, then on the device)."""
        spec = self.spec
        rng = np.random.default_rng(self.data_seed)
        h, w, c = shape = spec.shape
        k = self.num_classes
        # Smooth prototypes: low-frequency random fields upsampled to the image size.
        coarse = rng.uniform(0, 1, size=(k, max(2, h // 4), max(2, w // 4), c))
        rows = np.linspace(0, coarse.shape[1] - 1, h).round().astype(int)
        cols = np.linspace(0, coarse.shape[2] - 1, w).round().astype(int)
        prototypes = 0.5 + self.contrast * (coarse[:, rows][:, :, cols] - 0.5)
        train = make_arrays(shape, k, self.train_size, self.noise, rng, prototypes)
        test = make_arrays(shape, k, self.test_size, self.noise, rng, prototypes)
        train, test, val = split_validation(train, test, self.val_from, self.val_fraction)
        return Dataset(
            spec,
            to_device(train),
            to_device(test),
            None if val is None else to_device(val),
            source="generated in memory",
        )

    def locate(self) -> Located:
        """The spec and split sizes without generating the images (dry runs)."""
        sizes = split_sizes(self.train_size, self.test_size, self.val_from, self.val_fraction)
        return Located(self.spec, "generated in memory", sizes)
