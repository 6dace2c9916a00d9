"""Readers for the places image-classification data lives: files, TFDS, system copies.

Each reader returns host numpy arrays ``{"train": (x, y), "test": (x, y)}`` with
``x`` uint8 of shape (N, H, W, C) and ``y`` int32 of shape (N,), or raises
``DataNotFound`` so the caller can try the next source.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


class DataNotFound(Exception):
    """A source does not hold the dataset (the caller tries the next one)."""


# --- MNIST-family IDX files -------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (LeCun's MNIST format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}).")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} values.")
    return data.reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    raise DataNotFound(f"no {stem}[.gz] in {folder}")


def read_idx_folder(folder: str | os.PathLike) -> Arrays:
    """Reads the four MNIST-family IDX files (``train-images-idx3-ubyte.gz`` etc.)."""
    folder = Path(folder)
    out = {}
    for split, (images, labels) in _IDX_FILES.items():
        x = read_idx(_find(folder, images))
        y = read_idx(_find(folder, labels)).astype(np.int32)
        if x.ndim != 3 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{folder}: {split} images {x.shape} do not match labels {y.shape}.")
        out[split] = (x[..., None].astype(np.uint8), y)
    return out


# --- CIFAR-10 python batches --------------------------------------------------

_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = ["test_batch"]


def _cifar_batch(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = pickle.loads(blob, encoding="bytes")
    x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, np.asarray(d[b"labels"], np.int32)


def read_cifar10_folder(folder: str | os.PathLike) -> Arrays:
    """Reads CIFAR-10's python batches from a folder, its ``cifar-10-batches-py``
    subfolder, or the ``cifar-10-python.tar.gz`` archive in it."""
    folder = Path(folder)
    blobs: dict[str, bytes] = {}
    for cand in (folder, folder / "cifar-10-batches-py"):
        if all((cand / n).is_file() for n in _CIFAR_TRAIN + _CIFAR_TEST):
            blobs = {n: (cand / n).read_bytes() for n in _CIFAR_TRAIN + _CIFAR_TEST}
            break
    else:
        archive = folder / "cifar-10-python.tar.gz"
        if not archive.is_file():
            raise DataNotFound(f"no CIFAR-10 python batches or cifar-10-python.tar.gz in {folder}")
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in _CIFAR_TRAIN + _CIFAR_TEST:
                    blobs[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    parts = {
        s: [_cifar_batch(blobs[n]) for n in names]
        for s, names in (("train", _CIFAR_TRAIN), ("test", _CIFAR_TEST))
    }
    return {
        s: (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps]))
        for s, ps in parts.items()
    }


# --- TFDS ---------------------------------------------------------------------


def keep_tensorflow_off_gpu() -> None:
    """TensorFlow only feeds data: hide the GPUs from it so JAX keeps their memory."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # TF started already: it may hold GPU memory JAX needs
        logging.getLogger(__name__).warning(
            "TensorFlow already started; it may use the GPU (%s).", e
        )


def read_tfds(name: str, data_dir: str | None, download: bool) -> Arrays:
    """Reads ``train`` and ``test`` of a TFDS dataset as whole arrays.

    Args:
      name: the TFDS name (``mnist``, ``fashion_mnist``, ``cifar10``).
      data_dir: the TFDS data directory (None: ``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      download: whether to download and prepare it when it is not there yet.
    """
    root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
    if not download and not (root.expanduser() / name).is_dir():
        # Skips importing TensorFlow (seconds) when there is nothing to read.
        raise DataNotFound(f"no {name} folder in {root}")
    keep_tensorflow_off_gpu()
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise DataNotFound(f"TFDS {name!r} is not prepared in {builder.data_dir}")
        builder.download_and_prepare()
    out = {}
    for split in ("train", "test"):
        # Batched reading: batch_size=-1 aborts the process on some TF builds.
        ds = builder.as_dataset(split=split, as_supervised=True).batch(10_000)
        parts = list(tfds.as_numpy(ds))
        out[split] = (
            np.concatenate([x for x, _ in parts]).astype(np.uint8),
            np.concatenate([y for _, y in parts]).astype(np.int32),
        )
    return out
