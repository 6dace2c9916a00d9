"""Datasets: device-resident uint8 splits plus a spec that knows how to preprocess them.

Images stay uint8 on the device. Scaling to [0, 1], per-channel normalisation and
the optional resize happen per batch inside jitted code (``Spec.preprocess``), so a
CIFAR-10 resized to 112x112 never has to exist in memory as a whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
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


class _Candidate(NamedTuple):
    where: str
    read: Callable[[], sources.Arrays]  # raises DataNotFound when the source lacks the data
    # the same, cheaply: split sizes if known (a download: None, after probing its hosts)
    count: Callable[[], dict[str, int] | None]


def _candidates(
    files: Files,
    tfds_name: str | None,
    system_dirs: Sequence[str],
    source: str,
    data_dir: str | None,
    tfds_dir: str,
    download: bool,
) -> list[_Candidate]:
    """The sources to try, in order. A ``data_dir`` the user names is the only one:
    when it is missing or incomplete, that is the error (never a fall back)."""
    if data_dir and source in ("auto", "local"):
        sources.check_folder(files, data_dir, "dataset.data_dir")
        return [
            _Candidate(
                f"local files in {data_dir}",
                lambda: files.read(data_dir),
                lambda: files.count(data_dir),
            )
        ]
    if source == "local":
        raise UserError(
            f"dataset.source=local needs dataset.data_dir=PATH, a folder with {files.describe()}."
        )
    out = []
    use_tfds = source in ("auto", "tfds") and tfds_name is not None
    if use_tfds:
        # Prepared TFDS data first; a download is the last resort (slow, needs network).
        out.append(
            _Candidate(
                f"TFDS data dir {tfds_dir}",
                lambda: sources.read_tfds(tfds_name, tfds_dir, download=False),
                lambda: sources.tfds_prepared_sizes(tfds_name, tfds_dir),
            )
        )
    if source in ("auto", "system"):
        for d in system_dirs:

            def found(d=d) -> str:
                if not Path(d).is_dir():
                    raise sources.DataNotFound("absent")
                if files.missing(d):
                    raise sources.DataNotFound("incomplete")
                return d

            out.append(
                _Candidate(
                    f"system copy {d}",
                    lambda found=found: files.read(found()),
                    lambda found=found: files.count(found()),
                )
            )
    if use_tfds and download:
        out.append(
            _Candidate(
                "TFDS download",
                lambda: sources.read_tfds(tfds_name, tfds_dir, download=True),
                # the run's reachability probe, without the download
                lambda: sources.probe_download(tfds_name),
            )
        )
    return out


def _not_found(name, files, tfds_name, source, download, tried) -> UserError:
    ways = [f"put {files.describe()} in a folder and pass dataset.data_dir=PATH"]
    if source in ("auto", "tfds") and tfds_name is not None:
        ways.append("allow a TFDS download with dataset.download=true (needs network)")
        ways.append("point dataset.tfds_data_dir at TFDS data prepared with `tfds build`")
    return UserError(
        f"Could not find dataset {name!r} (dataset.source={source}, "
        f"dataset.download={str(download).lower()}). Tried: {'; '.join(tried) or 'nothing'}.\n"
        f"Either {', or '.join(ways)}."
    )


def _read(name, files, tfds_name, candidates, source, download, tfds_dir):
    """Reads from the first candidate that holds the data; returns the arrays and where from."""
    tried = []
    for c in candidates:
        try:
            return c.read(), c.where
        except sources.DataNotFound as e:
            tried.append(f"{c.where}: {e}")
        except sources.DownloadFailed as e:
            raise _download_failed(name, files, tfds_name, tfds_dir, e) from None
    raise _not_found(name, files, tfds_name, source, download, tried)


def _download_failed(name, files, tfds_name, tfds_dir, e: Exception) -> UserError:
    return UserError(
        f"Could not download dataset {name!r} with TFDS into {tfds_dir}: {e}\n"
        f"{_offline_hint(files, tfds_name)}"
    )


def _check_resize(resize: Sequence[int] | None) -> tuple[int, int] | None:
    if resize is None:
        return None
    r = tuple(resize)
    if len(r) != 2 or not all(isinstance(v, int) and v > 0 for v in r):
        raise UserError(f"dataset.resize must be two positive integers [H, W]; got {list(r)}.")
    return (int(r[0]), int(r[1]))


def _check_split(val_from: str, val_fraction: float) -> None:
    if val_from not in ("train", "test"):
        raise UserError(f"dataset.val_from must be 'train' or 'test'; got {val_from!r}.")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"dataset.val_fraction must be in [0, 1); got {val_fraction}.")


def _num_val(n: int, val_fraction: float) -> int:
    return 0 if val_fraction == 0.0 else max(1, int(round(n * val_fraction)))


def split_sizes(
    n_train: int, n_test: int, val_from: str, val_fraction: float, subset: int | None = None
) -> dict[str, int]:
    """The sizes ``split_validation`` gives (after ``subset``), from the split sizes alone."""
    _check_split(val_from, val_fraction)
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
    _check_split(val_from, val_fraction)
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


def _setup(
    name,
    shape,
    class_names,
    mean,
    std,
    files,
    tfds_name,
    system_dirs,
    source,
    data_dir,
    tfds_data_dir,
    download,
    val_from,
    val_fraction,
    resize,
    subset,
):
    """Checks every argument before any data is read; returns the spec and the sources."""
    if source not in SOURCES:
        raise UserError(f"dataset.source must be one of {', '.join(SOURCES)}; got {source!r}.")
    shape = tuple(int(s) for s in shape)
    class_names = tuple(str(c) for c in class_names)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(shape) != 3 or len(class_names) < 2:
        raise UserError(f"dataset.shape must be [H, W, C] and class_names 2 or more; got {shape}.")
    if len(mean) not in (1, shape[2]) or len(std) != len(mean):
        raise UserError(f"dataset.mean/std need 1 or {shape[2]} values each.")
    _check_split(val_from, val_fraction)
    if subset is not None and not (isinstance(subset, int) and subset > 0):
        raise UserError(
            f"dataset.subset must be a positive number of training examples, or null for "
            f"all of them; got {subset!r}."
        )
    spec = Spec(name, shape, len(class_names), class_names, mean, std, _check_resize(resize))
    tfds_dir = tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    candidates = _candidates(files, tfds_name, system_dirs, source, data_dir, tfds_dir, download)
    return spec, candidates, tfds_dir


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
      subset: keep only ``subset`` training examples, the same whatever the source
        (``take_subset``: the first in the order of their SHA-256).
    """
    spec, candidates, tfds_dir = _setup(
        name, shape, class_names, mean, std, files, tfds_name, system_dirs, source,
        data_dir, tfds_data_dir, download, val_from, val_fraction, resize, subset,
    )  # fmt: skip
    arrays, where = _read(name, files, tfds_name, candidates, source, download, tfds_dir)
    for split, (x, _) in arrays.items():
        if x.shape[1:] != spec.shape:
            raise UserError(
                f"{name} {split} images from {where} have shape {x.shape[1:]}, "
                f"expected {spec.shape}. Check dataset.data_dir."
            )
    train = arrays["train"]
    if subset is not None:
        train = take_subset(train, subset)
    train, test, val = split_validation(train, arrays["test"], val_from, val_fraction)
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


def locate(
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
) -> Located:
    """``load``'s checks and choice of source, without reading the data (for dry runs).

    Takes ``load``'s arguments and raises the same errors for bad arguments, a
    missing or incomplete ``data_dir``, or no source at all. Reads only file
    headers and TFDS's ``dataset_info.json``; imports no TensorFlow and never
    downloads, but where the run would download, probes the download hosts as the
    run does (``sources.probe_download``) and fails as the run would without them.
    """
    spec, candidates, tfds_dir = _setup(
        name, shape, class_names, mean, std, files, tfds_name, system_dirs, source,
        data_dir, tfds_data_dir, download, val_from, val_fraction, resize, subset,
    )  # fmt: skip
    tried = []
    for c in candidates:
        try:
            counts = c.count()
        except sources.DataNotFound as e:
            tried.append(f"{c.where}: {e}")
            continue
        except sources.DownloadFailed as e:
            raise _download_failed(name, files, tfds_name, tfds_dir, e) from None
        sizes = None
        if counts is not None:
            sizes = split_sizes(counts["train"], counts["test"], val_from, val_fraction, subset)
        return Located(spec, c.where, sizes)
    raise _not_found(name, files, tfds_name, source, download, tried)


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
