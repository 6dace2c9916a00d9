"""A small learnable image-classification set generated in memory, for tests and smoke runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bnn_bench.data.dataset import (
    Dataset,
    Located,
    Spec,
    _check_resize,
    split_sizes,
    split_validation,
    to_device,
)
from bnn_bench.errors import UserError


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


def _spec(shape: Sequence[int], num_classes: int, resize: Sequence[int] | None) -> Spec:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1 or num_classes < 2:
        raise UserError(
            f"synthetic: shape must be [H, W, C] and num_classes >= 2; "
            f"got {list(shape)}, {num_classes}."
        )
    names = tuple(f"class {i}" for i in range(num_classes))
    c = shape[2]
    return Spec(
        "synthetic", shape, num_classes, names, (0.5,) * c, (0.25,) * c, _check_resize(resize)
    )


def load(
    shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    train_size: int = 2048,
    test_size: int = 512,
    noise: float = 0.35,
    contrast: float = 0.25,
    data_seed: int = 0,
    val_from: str = "train",
    val_fraction: float = 0.1,
    resize: Sequence[int] | None = None,
) -> Dataset:
    """Synthetic images: each class is a smooth random pattern; samples are noisy copies.

    Learnable well above chance by every model, yet not perfectly separable at the
    default ``noise``, so calibration metrics are not degenerate. The data depend on
    ``data_seed`` only, never on the run's ``seed``.

    Args:
      shape: (H, W, C) of the images.
      num_classes: number of classes.
      train_size, test_size: examples per split (validation is carved from train).
      noise: standard deviation of the pixel noise, on a [0, 1] scale.
      contrast: how far the class patterns stray from grey (smaller is harder).
      data_seed: seed of the generator.
      val_from, val_fraction, resize: as for ``bnn_bench.data.load``.
    """
    spec = _spec(shape, num_classes, resize)
    shape = spec.shape
    rng = np.random.default_rng(data_seed)
    h, w, c = shape
    # Smooth prototypes: low-frequency random fields upsampled to the image size.
    coarse = rng.uniform(0, 1, size=(num_classes, max(2, h // 4), max(2, w // 4), c))
    rows = np.linspace(0, coarse.shape[1] - 1, h).round().astype(int)
    cols = np.linspace(0, coarse.shape[2] - 1, w).round().astype(int)
    prototypes = 0.5 + contrast * (coarse[:, rows][:, :, cols] - 0.5)
    train = make_arrays(shape, num_classes, train_size, noise, rng, prototypes)
    test = make_arrays(shape, num_classes, test_size, noise, rng, prototypes)
    train, test, val = split_validation(train, test, val_from, val_fraction)
    return Dataset(
        spec,
        to_device(train),
        to_device(test),
        None if val is None else to_device(val),
        source="generated in memory",
    )


def locate(
    shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    train_size: int = 2048,
    test_size: int = 512,
    noise: float = 0.35,
    contrast: float = 0.25,
    data_seed: int = 0,
    val_from: str = "train",
    val_fraction: float = 0.1,
    resize: Sequence[int] | None = None,
) -> Located:
    """``load``'s checks and split sizes without generating the images (for dry runs)."""
    del noise, contrast, data_seed
    sizes = split_sizes(train_size, test_size, val_from, val_fraction)
    return Located(_spec(shape, num_classes, resize), "generated in memory", sizes)
