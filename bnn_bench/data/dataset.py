"""Datasets: device-resident uint8 splits plus a spec that knows how to preprocess them.

Images stay uint8 on the device. Scaling to [0, 1], per-channel normalisation and
the optional resize happen per batch inside jitted code (``Spec.preprocess``), so a
CIFAR-10 resized to 112x112 never has to exist in memory as a whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnn_bench.data import sources
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
    """

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: tuple[int, int] | None = None

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


@dataclass(frozen=True)
class _Known:
    tfds_name: str
    shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    reader: str  # "idx" or "cifar"
    system_dirs: tuple[str, ...] = ()


_DIGITS = tuple(str(i) for i in range(10))
KNOWN = {
    "mnist": _Known(
        "mnist", (28, 28, 1), _DIGITS, (0.1307,), (0.3081,), "idx", ("/usr/share/datasets/mnist",)
    ),
    "fashion_mnist": _Known(
        "fashion_mnist",
        (28, 28, 1),
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        (0.2860,),
        (0.3530,),
        "idx",
        ("/usr/share/datasets/fashion-mnist",),
    ),
    "cifar10": _Known(
        "cifar10",
        (32, 32, 3),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "cifar",
    ),
}
SOURCES = ("auto", "local", "tfds", "system")


def _read_local(known: _Known, folder: str) -> sources.Arrays:
    if not Path(folder).is_dir():
        raise sources.DataNotFound(f"data_dir {folder} does not exist")
    if known.reader == "idx":
        return sources.read_idx_folder(folder)
    return sources.read_cifar10_folder(folder)


def _read(
    name: str,
    known: _Known,
    source: str,
    data_dir: str | None,
    tfds_data_dir: str | None,
    download: bool,
) -> tuple[sources.Arrays, str]:
    """Tries the sources in order; returns the arrays and where they came from."""
    tfds_dir = tfds_data_dir or os.environ.get("TFDS_DATA_DIR")
    attempts: list[tuple[str, object]] = []
    if source in ("auto", "local") and data_dir:
        attempts.append((f"local files in {data_dir}", lambda: _read_local(known, data_dir)))
    if source in ("auto", "tfds"):
        # Prepared TFDS data first; a download is the last resort because it is slow
        # and, without network, fails only after a timeout.
        attempts.append(
            (
                f"TFDS data dir {tfds_dir or '~/tensorflow_datasets'}",
                lambda: sources.read_tfds(known.tfds_name, tfds_dir, download=False),
            )
        )
    if source in ("auto", "system"):
        for d in known.system_dirs:
            attempts.append((f"system copy {d}", lambda d=d: _read_local(known, d)))
    if source in ("auto", "tfds") and download:
        attempts.append(
            ("TFDS download", lambda: sources.read_tfds(known.tfds_name, tfds_dir, download=True))
        )
    failures = []
    for where, read in attempts:
        try:
            return read(), where  # type: ignore[operator]
        except sources.DataNotFound as e:
            failures.append(f"  - {where}: {e}")
        except Exception as e:  # noqa: BLE001 - e.g. no network during a TFDS download
            if where != "TFDS download":
                raise
            failures.append(f"  - {where}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    tried = "\n".join(failures) or "  (no source was enabled)"
    raise UserError(
        f"Could not find dataset {name!r} (source={source}, download={download}). Tried:\n"
        f"{tried}\nPut the files in a folder and pass dataset.data_dir=PATH, point "
        f"dataset.tfds_data_dir at prepared TFDS data, or allow dataset.download=true "
        f"on a machine with network."
        + (
            "\nOn Debian/Ubuntu: apt-get install dataset-fashion-mnist."
            if name == "fashion_mnist"
            else ""
        )
    )


def _check_resize(resize: Sequence[int] | None) -> tuple[int, int] | None:
    if resize is None:
        return None
    r = tuple(resize)
    if len(r) != 2 or not all(isinstance(v, int) and v > 0 for v in r):
        raise UserError(f"dataset.resize must be two positive integers [H, W]; got {list(r)}.")
    return (int(r[0]), int(r[1]))


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
    if val_from not in ("train", "test"):
        raise UserError(f"dataset.val_from must be 'train' or 'test'; got {val_from!r}.")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"dataset.val_fraction must be in [0, 1); got {val_fraction}.")
    if val_fraction == 0.0:
        return train, test, None
    src = train if val_from == "train" else test
    n = src[0].shape[0]
    perm = np.random.default_rng(0).permutation(n)  # fixed: the split never moves with seed
    n_val = max(1, int(round(n * val_fraction)))
    keep, val = perm[n_val:], perm[:n_val]
    rest = (src[0][keep], src[1][keep])
    val_split = (src[0][val], src[1][val])
    return (rest, test, val_split) if val_from == "train" else (train, rest, val_split)


def to_device(arrays: tuple[np.ndarray, np.ndarray]) -> Split:
    return Split(jnp.asarray(arrays[0], jnp.uint8), jnp.asarray(arrays[1], jnp.int32))


def load(
    name: str,
    source: str = "auto",
    data_dir: str | None = None,
    tfds_data_dir: str | None = None,
    download: bool = True,
    val_from: str = "train",
    val_fraction: float = 0.1,
    resize: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    subset: int | None = None,
) -> Dataset:
    """Loads a known dataset from the first source that holds it, onto the device.

    Args:
      name: ``mnist``, ``fashion_mnist`` or ``cifar10``.
      source: ``auto`` (local files, prepared TFDS data, system copies, then a TFDS
        download), or one of ``local``, ``tfds``, ``system``.
      data_dir: a folder with the IDX ``.gz`` files or CIFAR-10 python batches.
      tfds_data_dir: the TFDS data directory (default ``TFDS_DATA_DIR``).
      download: allow TFDS to download when nothing else has the data.
      val_from, val_fraction: where validation comes from (see ``split_validation``).
      resize: [H, W] to resize into on the device (aspect ratio kept), or None.
      mean, std: per-channel normalisation (default: the dataset's own statistics).
      subset: keep only the first ``subset`` training examples (quick runs).
    """
    if name not in KNOWN:
        raise UserError(f"Unknown dataset {name!r}. Known: {', '.join(sorted(KNOWN))}, synthetic.")
    if source not in SOURCES:
        raise UserError(f"dataset.source must be one of {', '.join(SOURCES)}; got {source!r}.")
    known = KNOWN[name]
    resize = _check_resize(resize)
    arrays, where = _read(name, known, source, data_dir, tfds_data_dir, download)
    for split, (x, _) in arrays.items():
        if x.shape[1:] != known.shape:
            raise UserError(
                f"{name} {split} images from {where} have shape {x.shape[1:]}, "
                f"expected {known.shape}. Check dataset.data_dir."
            )
    train = arrays["train"]
    if subset is not None:
        train = (train[0][:subset], train[1][:subset])
    train, test, val = split_validation(train, arrays["test"], val_from, val_fraction)
    mean = tuple(mean) if mean is not None else known.mean
    std = tuple(std) if std is not None else known.std
    if len(mean) not in (1, known.shape[2]) or len(std) != len(mean):
        raise UserError(f"dataset.mean/std need 1 or {known.shape[2]} values each.")
    spec = Spec(name, known.shape, len(known.class_names), known.class_names, mean, std, resize)
    log.info(
        "dataset %s from %s: train %d, val %d, test %d, input %s",
        name,
        where,
        len(train[1]),
        0 if val is None else len(val[1]),
        len(test[1]),
        spec.input_shape,
    )
    return Dataset(
        spec,
        to_device(train),
        to_device(test),
        None if val is None else to_device(val),
        source=where,
    )
