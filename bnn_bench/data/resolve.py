"""Where a dataset config would load from, and its split sizes, without reading the data.

``dry_run=true`` calls ``resolve(cfg.dataset)``: it walks the same sources in the
same order as ``load`` (local files, prepared TFDS data, system copies, a TFDS
download) but only looks at file headers and metadata, and returns a ``Dataset``
whose splits hold ``jax.ShapeDtypeStruct``s instead of arrays. Validation-split
sizes come from ``split_validation`` itself, run on index arrays.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig

from bnn_bench.data import dataset as ds
from bnn_bench.data import sources
from bnn_bench.errors import UserError

log = logging.getLogger(__name__)

# (train, test) sizes of the known datasets as TFDS and their authors publish them
_SIZES = {"mnist": (60_000, 10_000), "fashion_mnist": (60_000, 10_000), "cifar10": (50_000, 10_000)}


def _idx_count(path: Path) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:2] != b"\0\0":
        raise UserError(f"{path} is not an IDX file (bad magic number {head[:4]!r}).")
    return int.from_bytes(head[4:8], "big")


def _local_sizes(known: Any, folder: str) -> tuple[int, int]:
    """(train, test) sizes of the files in ``folder``, from headers and names only."""
    path = Path(folder)
    if not path.is_dir():
        raise sources.DataNotFound(f"data_dir {folder} does not exist")
    if known.reader == "idx":
        train = _idx_count(sources._find(path, sources._IDX_FILES["train"][0]))
        test = _idx_count(sources._find(path, sources._IDX_FILES["test"][0]))
        return train, test
    names = sources._CIFAR_TRAIN + sources._CIFAR_TEST
    for cand in (path, path / "cifar-10-batches-py"):
        if all((cand / n).is_file() for n in names):
            return _SIZES["cifar10"]
    if (path / "cifar-10-python.tar.gz").is_file():
        return _SIZES["cifar10"]
    raise sources.DataNotFound(f"no CIFAR-10 python batches or cifar-10-python.tar.gz in {folder}")


def _tfds_sizes(name: str, data_dir: str | None) -> tuple[int, int]:
    """(train, test) sizes of prepared TFDS data, from its dataset_info.json."""
    root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
    for info in sorted((root.expanduser() / name).glob("*/dataset_info.json"), reverse=True):
        splits = {s["name"]: s for s in json.loads(info.read_text()).get("splits", [])}
        if {"train", "test"} <= set(splits):
            count = lambda s: (
                sum(int(n) for n in s.get("shardLengths", []))
                or int(  # noqa: E731
                    s.get("numExamples", 0)
                )
            )
            return count(splits["train"]), count(splits["test"])
    raise sources.DataNotFound(f"TFDS {name!r} is not prepared in {root}")


def _known_sizes(node: DictConfig) -> tuple[tuple[int, int], str, Any]:
    name = node.name
    if name not in ds.KNOWN:
        raise UserError(
            f"Unknown dataset {name!r}. Known: {', '.join(sorted(ds.KNOWN))}, synthetic."
        )
    known, source = ds.KNOWN[name], node.get("source", "auto")
    if source not in ds.SOURCES:
        raise UserError(f"dataset.source must be one of {', '.join(ds.SOURCES)}; got {source!r}.")
    data_dir, tfds_dir = node.get("data_dir"), node.get("tfds_data_dir")
    attempts = []
    if source in ("auto", "local") and data_dir:
        attempts.append((f"local files in {data_dir}", lambda: _local_sizes(known, data_dir)))
    if source in ("auto", "tfds"):
        attempts.append(
            (f"TFDS data dir {tfds_dir or '~/tensorflow_datasets'}",
             lambda: _tfds_sizes(known.tfds_name, tfds_dir))
        )  # fmt: skip
    if source in ("auto", "system"):
        for d in known.system_dirs:
            attempts.append((f"system copy {d}", lambda d=d: _local_sizes(known, d)))
    failures = []
    for where, sizes in attempts:
        try:
            return sizes(), where, known
        except sources.DataNotFound as e:
            failures.append(f"  - {where}: {e}")
    if source in ("auto", "tfds") and node.get("download", True):
        return _SIZES[name], "a TFDS download (not tried by a dry run)", known
    raise UserError(
        f"Could not find dataset {name!r} (source={source}). Tried:\n"
        + ("\n".join(failures) or "  (no source was enabled)")
        + "\nPut the files in a folder and pass dataset.data_dir=PATH, or point "
        "dataset.tfds_data_dir at prepared TFDS data."
    )


def _shapes(n: int, shape: tuple[int, int, int]) -> ds.Split:
    return ds.Split(
        jax.ShapeDtypeStruct((n, *shape), np.uint8), jax.ShapeDtypeStruct((n,), np.int32)
    )


def _splits(train: int, test: int, node: DictConfig) -> tuple[int, int, int]:
    """(train, test, val) sizes after ``split_validation``, run on index arrays."""
    a = lambda n: (np.arange(n), np.arange(n))  # noqa: E731
    tr, te, val = ds.split_validation(
        a(train), a(test), node.get("val_from", "train"), node.get("val_fraction", 0.1)
    )
    return len(tr[1]), len(te[1]), 0 if val is None else len(val[1])


def resolve(node: DictConfig) -> ds.Dataset:
    """The dataset ``node`` (a ``conf/dataset`` config) would load, as shapes only.

    ``Dataset.source`` says where the data would come from. A dataset target that
    this module does not know is loaded for real (slower, but never wrong).

    Raises:
      UserError: what ``load`` would raise for a missing source or a bad setting.
    """
    from bnn_bench.config import build

    target = str(node.get("_target_", ""))
    if target.endswith("synthetic.load"):
        train, test = node.get("train_size", 2048), node.get("test_size", 512)
        shape = tuple(int(s) for s in node.get("shape", (28, 28, 1)))
        c, k = shape[2], int(node.get("num_classes", 10))
        spec = ds.Spec("synthetic", shape, k, tuple(f"class {i}" for i in range(k)),
                       (0.5,) * c, (0.25,) * c, ds._check_resize(node.get("resize")))  # fmt: skip
        where = "generated in memory"
    elif target in ("bnn_bench.data.load", "bnn_bench.data.dataset.load"):
        (train, test), where, known = _known_sizes(node)
        if node.get("subset") is not None:
            train = min(train, int(node.subset))
        mean = tuple(node.get("mean") or known.mean)
        std = tuple(node.get("std") or known.std)
        if len(mean) not in (1, known.shape[2]) or len(std) != len(mean):
            raise UserError(f"dataset.mean/std need 1 or {known.shape[2]} values each.")
        spec = ds.Spec(node.name, known.shape, len(known.class_names), known.class_names,
                       mean, std, ds._check_resize(node.get("resize")))  # fmt: skip
    else:
        log.info("dataset target %s has no cheap resolve; loading it.", target)
        return build(node, "dataset")
    train, test, val = _splits(train, test, node)
    return ds.Dataset(
        spec,
        _shapes(train, spec.shape),
        _shapes(test, spec.shape),
        None if val == 0 else _shapes(val, spec.shape),
        source=where,
    )
