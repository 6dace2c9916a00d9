"""Readers for the places image-classification data lives: TFDS here, files (a
``data_dir``, system copies) in ``bnn_bench.data.files``.

Each reader returns host numpy arrays ``{"train": (x, y), "test": (x, y)}`` with
``x`` uint8 of shape (N, H, W, C) and ``y`` int32 of shape (N,). A source that does
not hold the data raises ``DataNotFound`` so the caller can try the next one; a
source that holds broken data (a truncated archive, a folder missing the test files)
raises ``UserError`` naming the file and what to do.

The file formats (``files.IdxFiles``, ``files.CifarBatches``) are ``_target_`` nodes
of the dataset YAMLs (``files:``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

log = logging.getLogger(__name__)

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


class DataNotFound(Exception):
    """A source does not hold the dataset (the caller tries the next one)."""


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
