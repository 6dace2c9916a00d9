"""The file formats a ``dataset.data_dir`` (or a system copy) holds: ``_target_`` nodes
of the dataset YAMLs (``files:``), ``IdxFiles`` for the MNIST family, ``CifarBatches``
for CIFAR-10 and CIFAR-100, ``MatFiles`` for SVHN. Each reads host numpy arrays
``{"train": (x, y), "test": (x, y)}``
(``sources.Arrays``); a folder that lacks the files raises ``sources.DataNotFound``, a
broken file ``UserError`` naming it.
"""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bnn_bench.data.sources import Arrays
from bnn_bench.errors import UserError

# --- MNIST-family IDX files -------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_BROKEN = (EOFError, OSError, zlib.error)  # gzip's truncated / corrupt stream errors
_REPLACE = "Re-download it or replace it with a good copy."


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (LeCun's MNIST format), gzipped or not.

    Raises:
      UserError: the file is truncated, corrupt or not an IDX file (names the file).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except _BROKEN as e:
        raise UserError(f"{path} is truncated or corrupt ({e}). {_REPLACE}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (magic number {raw[:4]!r}). {_REPLACE}")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if (len(raw) - offset) != int(np.prod(shape)) * dtype.itemsize:
        raise UserError(
            f"{path} is truncated: its header says {shape} but it holds "
            f"{max(len(raw) - offset, 0) // dtype.itemsize} values. {_REPLACE}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


class IdxFiles:
    """The four IDX files of an MNIST-family dataset, in one folder.

    Each file may also be present uncompressed (the name without ``.gz``).
    """

    def __init__(self, train_images: str, train_labels: str, test_images: str, test_labels: str):
        self.splits = {"train": (train_images, train_labels), "test": (test_images, test_labels)}

    @property
    def names(self) -> tuple[str, ...]:
        """The files a folder must hold."""
        return tuple(n for pair in self.splits.values() for n in pair)

    def describe(self) -> str:
        return "the four IDX files " + ", ".join(self.names)

    def _find(self, folder: Path, name: str) -> Path | None:
        stem = name[:-3] if name.endswith(".gz") else name
        for cand in (name, stem, stem + ".gz"):
            if (folder / cand).is_file():
                return folder / cand
        return None

    def missing(self, folder: str | os.PathLike) -> list[str]:
        """The files ``folder`` lacks (empty when it holds them all)."""
        return [n for n in self.names if self._find(Path(folder), n) is None]

    def count(self, folder: str | os.PathLike) -> dict[str, int]:
        """Examples per split, from the image files' headers alone."""
        out = {}
        for split, (images, _) in self.splits.items():
            path = self._find(Path(folder), images)
            try:
                with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
                    head = f.read(8)
            except _BROKEN as e:
                raise UserError(f"{path} is truncated or corrupt ({e}). {_REPLACE}") from None
            out[split] = int.from_bytes(head[4:8], "big")
        return out

    def read(self, folder: str | os.PathLike) -> Arrays:
        """Reads train and test from ``folder``, which must hold every file."""
        folder = Path(folder)
        out = {}
        for split, (images, labels) in self.splits.items():
            x = read_idx(self._find(folder, images))  # type: ignore[arg-type]
            y = read_idx(self._find(folder, labels)).astype(np.int32)  # type: ignore[arg-type]
            if x.ndim != 3 or x.shape[0] != y.shape[0]:
                raise UserError(
                    f"{folder}: {split} images {x.shape} do not match labels {y.shape}. {_REPLACE}"
                )
            out[split] = (x[..., None].astype(np.uint8), y)
        return out


# --- CIFAR-10 / CIFAR-100 python batches --------------------------------------


class CifarBatches:
    """CIFAR's python batches: loose, in a subfolder, or in the original archive.

    Each batch is a pickled dict with ``b"data"`` ((n, 3072) uint8, channel-major) and
    the labels under ``label_key`` (CIFAR-10: ``labels``; CIFAR-100: ``fine_labels``,
    beside its 20 ``coarse_labels``). A folder holds the data when it has every batch
    file, the ``subfolder`` with them (what the archive unpacks to), or the ``archive``.
    ``url``: where the archive is published (for messages).
    """

    def __init__(
        self,
        archive: str,
        subfolder: str,
        train: Sequence[str],
        test: Sequence[str],
        label_key: str = "labels",
        url: str | None = None,
    ):
        self.archive, self.subfolder, self.label_key = archive, subfolder, label_key
        self.splits = {"train": tuple(train), "test": tuple(test)}
        self.url = url

    @property
    def names(self) -> tuple[str, ...]:
        return self.splits["train"] + self.splits["test"]

    def describe(self) -> str:
        where = f" (from {self.url})" if self.url else ""
        return f"{self.archive}{where}, or its {self.subfolder}/ with {', '.join(self.names)}"

    def _batch_dir(self, folder: Path) -> Path | None:
        for cand in (folder, folder / self.subfolder):
            if all((cand / n).is_file() for n in self.names):
                return cand
        return None

    def missing(self, folder: str | os.PathLike) -> list[str]:
        folder = Path(folder)
        if self._batch_dir(folder) or (folder / self.archive).is_file():
            return []
        present = [n for n in self.names if (folder / n).is_file()]
        present += [n for n in self.names if (folder / self.subfolder / n).is_file()]
        if present:  # a partial copy: name the batches that are not there
            return [n for n in self.names if n not in present]
        return [self.archive]

    def count(self, folder: str | os.PathLike) -> None:
        """Unknown without unpickling every batch."""
        del folder

    def _blobs(self, folder: Path) -> dict[str, bytes]:
        batch_dir = self._batch_dir(folder)
        if batch_dir is not None:
            return {n: (batch_dir / n).read_bytes() for n in self.names}
        archive, blobs = folder / self.archive, {}
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if name in self.names and member.isfile():
                        blobs[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, *_BROKEN) as e:
            raise UserError(f"{archive} is truncated or corrupt ({e}). {_REPLACE}") from None
        lacking = [n for n in self.names if n not in blobs]
        if lacking:
            raise UserError(f"{archive} lacks {', '.join(lacking)}. {_REPLACE}")
        return blobs

    def read(self, folder: str | os.PathLike) -> Arrays:
        folder, out = Path(folder), {}
        blobs = self._blobs(folder)
        for split, names in self.splits.items():
            parts = []
            for n in names:
                try:
                    d = pickle.loads(blobs[n], encoding="bytes")
                    x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32)
                    y = np.asarray(d[self.label_key.encode()], np.int32)
                    parts.append((x.transpose(0, 2, 3, 1), y))
                except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
                    raise UserError(
                        f"CIFAR batch {n} in {folder} is unreadable "
                        f"({type(e).__name__}: {e}). {_REPLACE}"
                    ) from None
            out[split] = (
                np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]),
            )
        return out


# --- SVHN's MATLAB files ---------------------------------------------------------


class MatFiles:
    """SVHN's cropped digits: one MATLAB v5 file per split (``train_32x32.mat``,
    ``test_32x32.mat``), each with ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1), where
    label 10 stands for the digit 0. Read as TFDS reads them: images moved to the
    leading axis, label 10 mapped to 0 (``y % 10``). ``url``: where they are published
    (for messages).
    """

    def __init__(self, train: str, test: str, url: str | None = None):
        self.splits = {"train": train, "test": test}
        self.url = url

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.splits.values())

    def describe(self) -> str:
        where = f", from {self.url}" if self.url else ""
        return " and ".join(self.names) + f" (MATLAB files{where})"

    def missing(self, folder: str | os.PathLike) -> list[str]:
        return [n for n in self.names if not (Path(folder) / n).is_file()]

    def count(self, folder: str | os.PathLike) -> dict[str, int]:
        """Examples per split, from the files' variable headers alone (``whosmat``)."""
        out = {}
        for split, name in self.splits.items():
            path = Path(folder) / name
            shapes = {v: shape for v, shape, _ in _mat(path, whos=True)}
            if "X" not in shapes or len(shapes["X"]) != 4:
                raise UserError(f"{path} holds no 4-D image array X. {_REPLACE}")
            out[split] = int(shapes["X"][3])
        return out

    def read(self, folder: str | os.PathLike) -> Arrays:
        out = {}
        for split, name in self.splits.items():
            path = Path(folder) / name
            d = _mat(path)
            if "X" not in d or "y" not in d or d["X"].ndim != 4:
                raise UserError(f"{path} lacks SVHN's arrays X (32, 32, 3, N) and y. {_REPLACE}")
            x = np.moveaxis(np.asarray(d["X"], np.uint8), -1, 0)  # (N, 32, 32, 3)
            y = np.asarray(d["y"]).reshape(-1)
            if y.shape[0] != x.shape[0] or y.min(initial=1) < 1 or y.max(initial=1) > 10:
                raise UserError(
                    f"{path}: {x.shape[0]} images but labels of shape {d['y'].shape} in "
                    f"[{y.min(initial=1)}, {y.max(initial=1)}] (SVHN's are 1 to 10). {_REPLACE}"
                )
            out[split] = (np.ascontiguousarray(x), (y % 10).astype(np.int32))
        return out


def _mat(path: Path, whos: bool = False):
    """``scipy.io.loadmat`` (or ``whosmat``) of ``path``; a broken file is a UserError."""
    import scipy.io

    try:
        return scipy.io.whosmat(path) if whos else scipy.io.loadmat(path)
    except (ValueError, TypeError, OSError, *_BROKEN) as e:
        raise UserError(f"{path} is not a readable MATLAB file ({e}). {_REPLACE}") from None


def check_folder(
    files: IdxFiles | CifarBatches | MatFiles, folder: str | os.PathLike, what: str
) -> None:
    """Checks a folder the user named: a missing folder or file is an error, not a miss.

    Args:
      files: the format (from the dataset YAML's ``files``).
      folder: the folder.
      what: the config key that named it, for the message (``dataset.data_dir``).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"{what}={folder} does not exist. It should hold {files.describe()}. "
            f"Fix the path, or drop {what} to use TFDS."
        )
    lacking = files.missing(folder)
    if lacking:
        raise UserError(
            f"{what}={folder} lacks {', '.join(lacking)}. It should hold {files.describe()}."
        )
