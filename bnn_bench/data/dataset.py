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


SOURCES = ("auto", "local", "tfds", "system")
Files = sources.IdxFiles | sources.CifarBatches


def _offline_hint(files: Files, tfds_name: str | None) -> str:
    steps = [f"put {files.describe()} in a folder and pass dataset.data_dir=PATH"]
    if tfds_name:
        steps.append(
            f"run `tfds build {tfds_name} --data_dir=DIR` on a machine with network, "
            f"copy DIR here and pass dataset.tfds_data_dir=DIR"
        )
    return "To run without network, " + ", or ".join(steps) + "."


def _read(
    name: str,
    files: Files,
    tfds_name: str | None,
    system_dirs: Sequence[str],
    source: str,
    data_dir: str | None,
    tfds_data_dir: str | None,
    download: bool,
) -> tuple[sources.Arrays, str]:
    """Reads from the first source that holds the data; returns the arrays and where from.

    A ``data_dir`` the user names is the only source then: when it is missing or
    incomplete, that is the error (not a silent fall back to another copy).
    """
    if data_dir and source in ("auto", "local"):
        where = f"local files in {data_dir}"
        return sources.read_folder(files, data_dir, "dataset.data_dir"), where
    if source == "local":
        raise UserError(
            f"dataset.source=local needs dataset.data_dir=PATH, a folder with {files.describe()}."
        )
    tfds_dir = tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    use_tfds = source in ("auto", "tfds") and tfds_name is not None
    tried = []
    if use_tfds:
        # Prepared TFDS data first; a download is the last resort (slow, needs network).
        try:
            return sources.read_tfds(
                tfds_name, tfds_dir, download=False
            ), f"TFDS data dir {tfds_dir}"
        except sources.DataNotFound as e:
            tried.append(f"TFDS data dir: {e}")
    if source in ("auto", "system"):
        for d in system_dirs:
            lacking = files.missing(d) if Path(d).is_dir() else None
            if lacking == []:
                return files.read(d), f"system copy {d}"
            tried.append(f"system copy {d}: " + ("absent" if lacking is None else "incomplete"))
    if use_tfds and download:
        try:
            return sources.read_tfds(tfds_name, tfds_dir, download=True), "TFDS download"
        except sources.DownloadFailed as e:
            raise UserError(
                f"Could not download dataset {name!r} with TFDS into {tfds_dir}: {e}\n"
                f"{_offline_hint(files, tfds_name)}"
            ) from None
    ways = [f"put {files.describe()} in a folder and pass dataset.data_dir=PATH"]
    if use_tfds:
        ways.append("allow a TFDS download with dataset.download=true (needs network)")
        ways.append("point dataset.tfds_data_dir at TFDS data prepared with `tfds build`")
    raise UserError(
        f"Could not find dataset {name!r} (dataset.source={source}, "
        f"dataset.download={str(download).lower()}). Tried: {'; '.join(tried) or 'nothing'}.\n"
        f"Either {', or '.join(ways)}."
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
    shape: Sequence[int],
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    files: Files,
    tfds_name: str | None = None,
    system_dirs: Sequence[str] = (),
    source: str = "auto",
    data_dir: str | None = None,
    tfds_data_dir: str | None = None,
    download: bool = True,
    val_from: str = "train",
    val_fraction: float = 0.1,
    resize: Sequence[int] | None = None,
    subset: int | None = None,
) -> Dataset:
    """Loads an image-classification dataset from the first source that holds it.

    The facts (``shape`` to ``system_dirs``) come from the dataset's YAML
    (``conf/dataset/<name>.yaml``); the rest says where to look and how to split.

    Args:
      name: the dataset's name (in logs and metrics).
      shape: (H, W, C) of the stored images.
      class_names: one name per class; their number is the number of classes.
      mean, std: per-channel normalisation after scaling to [0, 1] (1 or C values).
      files: the file format a ``data_dir`` holds (``sources.IdxFiles``, ``sources.CifarBatches``).
      tfds_name: the TFDS name, or None when TFDS does not have it.
      system_dirs: folders where a system package installs the files.
      source: ``auto`` (``data_dir`` when given; else prepared TFDS data, system
        copies, then a TFDS download), or one of ``local``, ``tfds``, ``system``.
      data_dir: a folder with ``files``; when given, the only source.
      tfds_data_dir: the TFDS data directory (default ``$TFDS_DATA_DIR``, else
        ``~/tensorflow_datasets``).
      download: allow TFDS to download when nothing else has the data.
      val_from, val_fraction: where validation comes from (see ``split_validation``).
      resize: [H, W] to resize into on the device (aspect ratio kept), or None.
      subset: keep only the first ``subset`` training examples (quick runs).
    """
    if source not in SOURCES:
        raise UserError(f"dataset.source must be one of {', '.join(SOURCES)}; got {source!r}.")
    shape = tuple(int(s) for s in shape)
    class_names = tuple(str(c) for c in class_names)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(shape) != 3 or len(class_names) < 2:
        raise UserError(f"dataset.shape must be [H, W, C] and class_names 2 or more; got {shape}.")
    if len(mean) not in (1, shape[2]) or len(std) != len(mean):
        raise UserError(f"dataset.mean/std need 1 or {shape[2]} values each.")
    resize = _check_resize(resize)
    arrays, where = _read(
        name, files, tfds_name, system_dirs, source, data_dir, tfds_data_dir, download
    )
    for split, (x, _) in arrays.items():
        if x.shape[1:] != shape:
            raise UserError(
                f"{name} {split} images from {where} have shape {x.shape[1:]}, "
                f"expected {shape}. Check dataset.data_dir."
            )
    train = arrays["train"]
    if subset is not None:
        train = (train[0][:subset], train[1][:subset])
    train, test, val = split_validation(train, arrays["test"], val_from, val_fraction)
    spec = Spec(name, shape, len(class_names), class_names, mean, std, resize)
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


def preset(name: str, **overrides) -> Dataset:
    """Loads the dataset of ``conf/dataset/<name>.yaml``, for scripts outside the CLI.

    Example: ``preset("fashion_mnist", val_fraction=0.0)``.
    """
    from omegaconf import OmegaConf

    from bnn_bench.config import build

    here = Path(__file__).resolve().parents[1]
    conf = here / "conf" if (here / "conf").is_dir() else here.parent / "conf"
    path = conf / "dataset" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise UserError(f"Unknown dataset {name!r}. Known: {', '.join(known)}.")
    return build(OmegaConf.merge(OmegaConf.load(path), overrides), "dataset")
