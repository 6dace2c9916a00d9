"""Datasets: device-resident uint8 splits plus a spec that knows how to preprocess them.

Images stay uint8 on the device. Scaling to [0, 1], per-channel normalisation and
the optional resize happen per batch inside jitted code (``Spec.preprocess``), so a
CIFAR-10 resized to 112x112 never has to exist in memory as a whole.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnn_bench.errors import UserError

log = logging.getLogger(__name__)


class Split(NamedTuple):
    """One split on the device. ``x``: (N, H, W, C) uint8; ``y``: (N,) int32."""

    x: jax.Array
    y: jax.Array

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


def resized_shape(shape: Sequence[int], size: Sequence[int] | None) -> tuple[int, int, int]:
    """(H, W, C) after resizing into ``size`` keeping the aspect ratio.

    As ``tf.image.resize(..., preserve_aspect_ratio=True)``: scale by
    min(h'/h, w'/w) and round, so the image fits inside ``size``.
    """
    h, w, c = shape
    if size is None:
        return (h, w, c)
    scale = min(size[0] / h, size[1] / w)
    return (int(round(scale * h)), int(round(scale * w)), c)


@dataclass(frozen=True)
class Spec:
    """What a model needs to know about the data.

    Attributes:
      name: dataset name.
      shape: (H, W, C) of the stored uint8 images.
      num_classes: number of classes.
      class_names: one name per class.
      mean, std: per-channel normalisation applied after scaling to [0, 1].
      resize: (H', W') box to resize into on the device, or None.
      augment: training minibatches get a random crop and flip (``data.augment``);
        evaluation never does.
    """

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: tuple[int, int] | None = None
    augment: bool = False

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) that the model sees."""
        return resized_shape(self.shape, self.resize)

    def preprocess(self, x: jax.Array) -> jax.Array:
        """uint8 (B, H, W, C) -> float32 (B, H', W', C), normalised and resized. Jittable."""
        x = x.astype(jnp.float32) / 255.0
        x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
        if self.resize is not None and self.input_shape != self.shape:
            h, w, c = self.input_shape
            # antialias=False: bilinear as tf.image.resize does by default.
            x = jax.image.resize(x, (x.shape[0], h, w, c), method="linear", antialias=False)
        return x


@dataclass(frozen=True)
class Dataset:
    """A dataset on the device: train, optional validation, test."""

    spec: Spec
    train: Split
    test: Split
    val: Split | None = None
    source: str = ""


def check_resize(resize: Sequence[int] | None) -> tuple[int, int] | None:
    """``resize`` as (H, W) (its type and range: the dataset config's annotation)."""
    return None if resize is None else (int(resize[0]), int(resize[1]))


def _num_val(n: int, val_fraction: float) -> int:
    return 0 if val_fraction == 0.0 else max(1, int(round(n * val_fraction)))


def split_sizes(
    n_train: int, n_test: int, val_from: str, val_fraction: float, subset: int | None = None
) -> dict[str, int]:
    """The sizes ``split_validation`` gives (after ``subset``), from the split sizes alone."""
    n_train = n_train if subset is None else min(n_train, subset)
    n_val = _num_val(n_train if val_from == "train" else n_test, val_fraction)
    if val_from == "train":
        return {"train": n_train - n_val, "val": n_val, "test": n_test}
    return {"train": n_train, "val": n_val, "test": n_test - n_val}


def split_validation(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    val_from: str,
    val_fraction: float,
):
    """Carves a validation split out of train or test with a fixed permutation.

    ``val_from="test"`` with ``val_fraction=0.5`` is the JaxSGMC tutorial's choice:
    half of the test split validates, the other half tests.
    """
    if val_fraction == 0.0:
        return train, test, None
    src = train if val_from == "train" else test
    n = src[0].shape[0]
    perm = np.random.default_rng(0).permutation(n)  # fixed: the split never moves with seed
    n_val = _num_val(n, val_fraction)
    keep, val = perm[n_val:], perm[:n_val]
    rest = (src[0][keep], src[1][keep])
    val_split = (src[0][val], src[1][val])
    return (rest, test, val_split) if val_from == "train" else (train, rest, val_split)


def take_subset(train: tuple[np.ndarray, np.ndarray], subset: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``subset`` training examples first in the order of their SHA-256 (of the label,
    then the image's bytes), in that order.

    Sources store the same examples in different orders (TFDS stores MNIST-family data in
    the order of a hash of each example's key, not the IDX files' published order), so
    "the first N" as stored would be another subset, and another posterior, on a machine
    whose data came from elsewhere. An order by content is the same from every source, and
    so is the validation split carved from it.
    """
    x, y = train
    n = len(y)
    label = np.asarray(y, "<i8").view(np.uint8).reshape(n, 8)
    rows = np.concatenate([label, np.ascontiguousarray(x, np.uint8).reshape(n, -1)], axis=1)
    digests = np.array([hashlib.sha256(r).digest() for r in rows], dtype="S32")
    # Identical examples tie, and then either order gives the same arrays.
    keep = np.argsort(digests, kind="stable")[:subset]
    return x[keep], y[keep]


def to_device(arrays: tuple[np.ndarray, np.ndarray]) -> Split:
    return Split(jnp.asarray(arrays[0], jnp.uint8), jnp.asarray(arrays[1], jnp.int32))


@dataclass(frozen=True)
class Located:
    """Where a dataset would be read from, found without reading its data.

    Attributes:
      spec: as the loaded dataset's.
      source: the source ``load`` would read (as ``Dataset.source``).
      sizes: ``{"train", "val", "test"}`` examples after ``subset`` and the
        validation split, or None where they cannot be known without reading
        (CIFAR-10's pickles, a download).
    """

    spec: Spec
    source: str
    sizes: dict[str, int] | None


def preset(name: str, **overrides) -> Dataset:
    """Loads the dataset of ``conf/dataset/<name>.yaml``, for scripts outside the CLI.

    Example: ``preset("fashion_mnist", val_fraction=0.0)``.
    """
    from omegaconf import OmegaConf

    from bnn_bench.config import build, validate

    here = Path(__file__).resolve().parents[1]
    conf = here / "conf" if (here / "conf").is_dir() else here.parent / "conf"
    path = conf / "dataset" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise UserError(f"Unknown dataset {name!r}. Known: {', '.join(known)}.")
    node = OmegaConf.merge(OmegaConf.load(path), overrides)
    validate(node, "dataset")
    return build(node, "dataset").load()
