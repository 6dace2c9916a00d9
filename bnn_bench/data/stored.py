"""A dataset stored somewhere (local files, TFDS, a system copy): its typed config.

``conf/dataset/{mnist,fashion_mnist,cifar10,cifar100,svhn}.yaml`` target ``StoredDataset``; its
fields are the YAML's keys. ``load()`` reads the data from the first source that holds
it; ``locate()`` makes the same checks and walks the same sources in the same order,
but reads only file headers and metadata (``dry_run=true``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from bnn_bench.data import sources
from bnn_bench.data.dataset import (
    Dataset,
    Located,
    Spec,
    check_resize,
    split_sizes,
    split_validation,
    take_subset,
    to_device,
)
from bnn_bench.data.files import CifarBatches, IdxFiles, MatFiles, check_folder
from bnn_bench.errors import UserError
from bnn_bench.schema import Interval, Positive

log = logging.getLogger(__name__)

Files = IdxFiles | CifarBatches | MatFiles
# (train, test) sizes as TFDS and the authors publish them: for sources whose sizes
# cannot be read without reading the data (CIFAR-10's pickles, a download)
PUBLISHED = {
    "mnist": (60_000, 10_000),
    "fashion_mnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
    "svhn": (73_257, 26_032),  # the cropped digits' train and test (without extra)
}


@dataclass(frozen=True)
class StoredDataset:
    """An image-classification dataset read from the first source that holds it.

    The facts (``name`` to ``system_dirs``) come from the dataset's YAML
    (``conf/dataset/<name>.yaml``); the rest says where to look and how to split.

    Attributes:
      name: the dataset's name (in logs and metrics).
      shape: (H, W, C) of the stored images.
      class_names: one name per class; their number is the number of classes.
      mean, std: per-channel normalisation after scaling to [0, 1] (1 or C values).
      files: the file format a ``data_dir`` holds (``files.IdxFiles``, ``files.CifarBatches``,
        ``files.MatFiles``).
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
      augment: a random crop (4-pixel padding) and horizontal flip of every training
        minibatch, on the device (``data.augment``); evaluation never sees it.
    """

    name: str
    shape: tuple[int, int, int]
    class_names: Sequence[str]
    mean: Sequence[float]
    std: Sequence[float]
    files: Files
    tfds_name: str | None = None
    system_dirs: Sequence[str] = ()
    source: Literal["auto", "local", "tfds", "system"] = "auto"
    data_dir: str | None = None
    tfds_data_dir: str | None = None
    download: bool = True
    val_from: Literal["train", "test"] = "train"
    val_fraction: Annotated[float, Interval(0, 1, hi_open=True)] = 0.1
    resize: tuple[Annotated[int, Positive], Annotated[int, Positive]] | None = None
    subset: Annotated[int, Positive] | None = None
    augment: bool = False

    @property
    def spec(self) -> Spec:
        """The dataset's spec (checked: [H, W, C], 2 or more classes, 1 or C mean/std)."""
        shape = tuple(int(s) for s in self.shape)
        names = tuple(str(c) for c in self.class_names)
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(shape) != 3 or len(names) < 2:
            raise UserError(
                f"dataset.shape must be [H, W, C] and class_names 2 or more; got {shape}."
            )
        if len(mean) not in (1, shape[2]) or len(std) != len(mean):
            raise UserError(f"dataset.mean/std need 1 or {shape[2]} values each.")
        resize = check_resize(self.resize)
        return Spec(self.name, shape, len(names), names, mean, std, resize, augment=self.augment)

    @property
    def _tfds_dir(self) -> str:
        return self.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"

    def load(self) -> Dataset:
        """Reads the data from the first source that holds it, then takes ``subset``
        and carves the validation split.

        Raises:
          UserError: no source holds it, a download failed, or its images have
            another shape than ``shape``.
        """
        spec = self.spec
        arrays, where = self._read(_candidates(self, self._tfds_dir))
        for split, (x, _) in arrays.items():
            if x.shape[1:] != spec.shape:
                raise UserError(
                    f"{self.name} {split} images from {where} have shape {x.shape[1:]}, "
                    f"expected {spec.shape}. Check dataset.data_dir."
                )
        train = arrays["train"]
        if self.subset is not None:
            train = take_subset(train, self.subset)
        train, test, val = split_validation(train, arrays["test"], self.val_from, self.val_fraction)
        log.info(
            "dataset %s from %s: train %d, val %d, test %d, input %s",
            self.name,
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

    def _read(self, candidates: list[_Candidate]) -> tuple[sources.Arrays, str]:
        """Reads from the first candidate that holds the data; the arrays and where from."""
        tried = []
        for c in candidates:
            try:
                return c.read(), c.where
            except sources.DataNotFound as e:
                tried.append(f"{c.where}: {e}")
            except sources.DownloadFailed as e:
                raise _download_failed(self, self._tfds_dir, e) from None
        raise _not_found(self, tried)

    def locate(self) -> Located:
        """``load``'s checks and choice of source, without reading the data (dry runs).

        Raises the same errors for a missing or incomplete ``data_dir``, or no source
        at all. Reads only file headers and TFDS's ``dataset_info.json``; imports no
        TensorFlow and never downloads, but where the run would download, probes the
        download hosts as the run does (``sources.probe_download``) and fails as the
        run would without them. Sizes no source tells come from ``PUBLISHED``.
        """
        spec, tried = self.spec, []
        for c in _candidates(self, self._tfds_dir):
            try:
                counts = c.count()
            except sources.DataNotFound as e:
                tried.append(f"{c.where}: {e}")
                continue
            except sources.DownloadFailed as e:
                raise _download_failed(self, self._tfds_dir, e) from None
            if counts is None and self.name in PUBLISHED:
                counts = dict(zip(("train", "test"), PUBLISHED[self.name], strict=True))
            sizes = None
            if counts is not None:
                sizes = split_sizes(
                    counts["train"], counts["test"], self.val_from, self.val_fraction, self.subset
                )
            return Located(spec, c.where, sizes)
        raise _not_found(self, tried)


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


def _candidates(d: StoredDataset, tfds_dir: str) -> list[_Candidate]:
    """The sources to try, in order. A ``data_dir`` the user names is the only one:
    when it is missing or incomplete, that is the error (never a fall back)."""
    files, tfds_name, source, data_dir = d.files, d.tfds_name, d.source, d.data_dir
    if data_dir and source in ("auto", "local"):
        check_folder(files, data_dir, "dataset.data_dir")
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
        for folder in d.system_dirs:

            def found(folder=folder) -> str:
                if not Path(folder).is_dir():
                    raise sources.DataNotFound("absent")
                if files.missing(folder):
                    raise sources.DataNotFound("incomplete")
                return folder

            out.append(
                _Candidate(
                    f"system copy {folder}",
                    lambda found=found: files.read(found()),
                    lambda found=found: files.count(found()),
                )
            )
    if use_tfds and d.download:
        out.append(
            _Candidate(
                "TFDS download",
                lambda: sources.read_tfds(tfds_name, tfds_dir, download=True),
                # the run's reachability probe, without the download
                lambda: sources.probe_download(tfds_name),
            )
        )
    return out


def _not_found(d: StoredDataset, tried: list[str]) -> UserError:
    ways = [f"put {d.files.describe()} in a folder and pass dataset.data_dir=PATH"]
    if d.source in ("auto", "tfds") and d.tfds_name is not None:
        ways.append("allow a TFDS download with dataset.download=true (needs network)")
        ways.append("point dataset.tfds_data_dir at TFDS data prepared with `tfds build`")
    return UserError(
        f"Could not find dataset {d.name!r} (dataset.source={d.source}, "
        f"dataset.download={str(d.download).lower()}). Tried: {'; '.join(tried) or 'nothing'}.\n"
        f"Either {', or '.join(ways)}."
    )


def _download_failed(d: StoredDataset, tfds_dir: str, e: Exception) -> UserError:
    return UserError(
        f"Could not download dataset {d.name!r} with TFDS into {tfds_dir}: {e}\n"
        f"{_offline_hint(d.files, d.tfds_name)}"
    )


@contextlib.contextmanager
def config_key(key: str) -> Iterator[None]:
    """Within it, a dataset's errors name its keys under ``key``: a dataset config
    composed as ``eval.ood_dataset`` says ``eval.ood_dataset.data_dir=PATH`` where the
    run's own dataset says ``dataset.data_dir=PATH``.

    Raises:
      UserError: the error raised inside, with its ``dataset.<key>`` names moved.
    """
    try:
        yield
    except UserError as e:
        # a config key starts the message or follows a space, "(" or "`"; a path does not
        raise UserError(re.sub(r"(^|[\s(`])dataset\.", rf"\g<1>{key}.", str(e))) from None
