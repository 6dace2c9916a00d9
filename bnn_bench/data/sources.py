"""Readers for the places image-classification data lives: files, TFDS, system copies.

Each reader returns host numpy arrays ``{"train": (x, y), "test": (x, y)}`` with
``x`` uint8 of shape (N, H, W, C) and ``y`` int32 of shape (N,). A source that does
not hold the data raises ``DataNotFound`` so the caller can try the next one; a
source that holds broken data (a truncated archive, a folder missing the test files)
raises ``UserError`` naming the file and what to do.

The file formats are ``_target_`` nodes of the dataset YAMLs (``files:``):
``IdxFiles`` for the MNIST family, ``CifarBatches`` for CIFAR-10.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import shutil
import tarfile
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from bnn_bench.errors import UserError

log = logging.getLogger(__name__)

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


class DataNotFound(Exception):
    """A source does not hold the dataset (the caller tries the next one)."""


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


# --- CIFAR-10 python batches --------------------------------------------------


class CifarBatches:
    """CIFAR-10's python batches: loose, in a subfolder, or in the original archive.

    A folder holds the data when it has every batch file, the ``subfolder`` with
    them (what the archive unpacks to), or the ``archive`` itself.
    """

    def __init__(self, archive: str, subfolder: str, train: Sequence[str], test: Sequence[str]):
        self.archive, self.subfolder = archive, subfolder
        self.splits = {"train": tuple(train), "test": tuple(test)}

    @property
    def names(self) -> tuple[str, ...]:
        return self.splits["train"] + self.splits["test"]

    def describe(self) -> str:
        return f"{self.archive}, or its {self.subfolder}/ with {', '.join(self.names)}"

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
                    parts.append((x.transpose(0, 2, 3, 1), np.asarray(d[b"labels"], np.int32)))
                except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
                    raise UserError(
                        f"CIFAR-10 batch {n} in {folder} is unreadable "
                        f"({type(e).__name__}: {e}). {_REPLACE}"
                    ) from None
            out[split] = (
                np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]),
            )
        return out


def check_folder(files: IdxFiles | CifarBatches, folder: str | os.PathLike, what: str) -> None:
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


# --- TFDS ---------------------------------------------------------------------


def keep_tensorflow_off_gpu() -> None:
    """TensorFlow only feeds data: hide the GPUs from it so JAX keeps their memory."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # TF started already: it may hold GPU memory JAX needs
        log.warning("TensorFlow already started; it may use the GPU (%s).", e)


class DownloadFailed(Exception):
    """A TFDS download could not run (no network, host down, bad file)."""


def check_reachable(urls: Iterable[str], timeout: float = 10.0) -> None:
    """Fails fast when a download host does not answer.

    TFDS retries a failed download ten times with exponential back-off (about
    220 s without network); one HEAD request per host, all within ``timeout``
    seconds (DNS included), tells the same in seconds. Any HTTP answer counts as
    reachable; proxies from the environment are honoured as in the download.

    Raises:
      DownloadFailed: naming the host that did not answer and why.
    """
    import requests

    hosts: dict[tuple[str, str], str] = {}
    for url in urls:
        p = urlparse(url)
        if p.scheme in ("http", "https"):
            hosts.setdefault((p.scheme, p.netloc), url)
    errors: dict[str, str] = {}

    def head(netloc: str, url: str) -> None:
        try:
            requests.head(url, timeout=timeout, allow_redirects=False)
        except requests.RequestException as e:
            # urllib3 nests the cause (e.g. NameResolutionError) in a MaxRetryError.
            cause = getattr(e.args[0], "reason", None) if e.args else None
            text = str(cause or e).splitlines()[0]
            if text.startswith("HTTP") and "): " in text:  # "HTTPSConnection(host=...): why"
                text = text.split("): ", 1)[1]
            errors[netloc] = text[:300]

    # Daemon threads: getaddrinfo has no timeout, and a hung lookup must not hold the run.
    threads = [
        threading.Thread(target=head, args=(netloc, url), daemon=True)
        for (_, netloc), url in hosts.items()
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t, (_, netloc) in zip(threads, hosts, strict=True):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            errors.setdefault(netloc, f"no answer within {timeout:g} s")
    if errors:
        raise DownloadFailed("; ".join(f"cannot reach {h} ({why})" for h, why in errors.items()))


class _Cleanup:
    """Removes what a failed TFDS download left in its data dir, and nothing older.

    TFDS creates ``<root>/<name>/``, ``downloads/``, ``downloads/<name>/`` and
    ``downloads/extracted/`` before its first request, and ``*.tmp.*`` /
    ``incomplete.*`` entries while it works. After a failure, temporary entries this
    run created are deleted, then every folder this run created that is empty.
    """

    def __init__(self, root: Path, name: str):
        self.root = root
        self.subtrees = [root / name.split("/")[0], root / "downloads"]
        self.before = self._snapshot()

    def _entries(self, top: Path) -> list[Path]:
        """Entries up to two levels below ``top``, deepest first. TFDS works no deeper
        (``downloads/<name>/<file>.tmp.<id>``, ``<name>/<config>/incomplete.<id>``), and a
        shared data dir may hold millions of extracted files further down."""
        level1 = list(top.iterdir()) if top.is_dir() else []
        level2 = [q for p in level1 if p.is_dir() for q in p.iterdir()]
        return level2 + level1

    def _snapshot(self) -> set[Path]:
        seen = {self.root} if self.root.exists() else set()
        for top in self.subtrees:
            if top.exists():
                seen.add(top)
                seen.update(self._entries(top))
        return seen

    def __call__(self) -> None:
        for top in self.subtrees:
            for p in self._entries(top):
                if p in self.before:
                    continue
                if ".tmp." in p.name or ".incomplete" in p.name or "incomplete." in p.name:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                else:
                    self._rmdir_if_new_and_empty(p)
            self._rmdir_if_new_and_empty(top)
        self._rmdir_if_new_and_empty(self.root)

    def _rmdir_if_new_and_empty(self, d: Path) -> None:
        if d not in self.before and d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def probe_download(name: str, timeout: float = 10.0) -> None:
    """The reachability check ``tfds_builder`` makes before a download, alone (for a
    dry run): imports TFDS's builder class for the URLs, not TensorFlow.

    Raises:
      DownloadFailed: a download host did not answer.
    """
    import tensorflow_datasets as tfds

    check_reachable(tfds.builder_cls(name.split("/")[0]).url_infos or (), timeout)


def tfds_builder(name: str, data_dir: str | None, download: bool, probe_timeout: float = 10.0):
    """A prepared TFDS builder: prepared already, or downloaded and prepared now.

    Args:
      name: the TFDS name, with a config where it has one (``cifar10_corrupted/fog_1``).
      data_dir: the TFDS data directory (None: ``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      download: whether to download and prepare it when it is not there yet.
      probe_timeout: seconds to wait for each download host before giving up.

    Raises:
      DataNotFound: not prepared, and ``download`` is off.
      DownloadFailed: the download or preparation failed (no network, bad file).
        Nothing this call created is left behind, so a later run starts clean.
    """
    root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
    root, base = root.expanduser(), name.split("/")[0]
    if not download and not (root / base).is_dir():
        # Skips importing TensorFlow (seconds) when there is nothing to read.
        raise DataNotFound(f"no {base} folder in {root}")
    probed = False
    if download and not list((root / name).glob("*/dataset_info.json")):
        # Not prepared: check the download hosts before importing TensorFlow (10-30 s),
        # so that a run without network stops soon. TFDS alone does not import it.
        probe_download(name, probe_timeout)
        probed = True
    keep_tensorflow_off_gpu()
    import tensorflow_datasets as tfds

    cleanup = _Cleanup(root, name)
    absl = logging.getLogger("absl")
    absl.addFilter(_quiet_variant_folders)
    try:
        builder = tfds.builder(name, data_dir=str(root))
        if builder.is_prepared():
            return builder
        if not download:
            raise DataNotFound(f"TFDS {name!r} is not prepared in {builder.data_dir}")
        if not probed:
            check_reachable(type(builder).url_infos or (), probe_timeout)
        log.info("downloading %s with TFDS into %s", name, root)
        builder.download_and_prepare()
        return builder
    except (DataNotFound, ImportError):
        cleanup()  # a missing module is a broken install, not a download problem
        raise
    except DownloadFailed:
        cleanup()
        raise
    except Exception as e:  # noqa: BLE001 - TFDS raises many types for one failed download
        cleanup()
        raise DownloadFailed(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    finally:
        absl.removeFilter(_quiet_variant_folders)


def _quiet_variant_folders(record: logging.LogRecord) -> bool:
    """Drops TFDS's warning about each version folder of a dataset not prepared yet."""
    return not str(record.msg).startswith("Variant folder")


def tfds_prepared_sizes(name: str, data_dir: str | None) -> dict[str, int]:
    """Examples per split of prepared TFDS data, from its ``dataset_info.json`` alone
    (no TensorFlow import). The newest prepared version counts.

    Raises:
      DataNotFound: no prepared version in the data dir.
    """
    root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
    infos = sorted(
        (root.expanduser() / name).glob("*/dataset_info.json"),
        key=lambda p: tuple(int(v) for v in p.parent.name.split(".") if v.isdigit()),
    )
    if not infos:
        raise DataNotFound(f"no prepared {name} in {root}")
    splits = json.loads(infos[-1].read_text())["splits"]
    return {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in splits}


def read_tfds(name: str, data_dir: str | None, download: bool) -> Arrays:
    """Reads ``train`` and ``test`` of a TFDS dataset as whole arrays.

    Args:
      name: the TFDS name (``mnist``, ``fashion_mnist``, ``cifar10``).
      data_dir: the TFDS data directory (None: ``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      download: whether to download and prepare it when it is not there yet.
    """
    builder = tfds_builder(name, data_dir, download)
    import tensorflow_datasets as tfds

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
