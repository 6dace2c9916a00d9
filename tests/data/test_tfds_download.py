"""TFDS's real download-and-prepare path, end to end and offline.

Small archives in the real formats (LeCun's gzipped IDX files, CIFAR-10's and
CIFAR-100's binary tarballs, SVHN's MATLAB v5 files, CIFAR-10-C's tar of .npy arrays)
are served over HTTP from 127.0.0.1. The real TFDS builders download them, check their
checksums, extract them, write their record files and read them back, driven by
bnn-bench's public loaders. Any module that path imports and that is not installed fails
these tests.

What is bypassed, and how (each with ``monkeypatch``, undone after the test):
- the download URL: the builder's URL constant points at the loopback server;
- checksum registration: the builder's ``url_infos`` (the registered size and
  sha256 of each URL) lists the loopback URLs with the served files' own size and
  sha256, so TFDS still verifies every download;
- MNIST's example counts: its builder reads a fixed 60,000/10,000 images, so its two
  count constants are set to the small archive's sizes.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bnn_bench.data import preset
from bnn_bench.errors import UserError
from tests.data.test_sources import located, write_idx

pytestmark = pytest.mark.unit

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www``; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    for var in ("NO_PROXY", "no_proxy"):  # a CI proxy must not intercept loopback
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def register(monkeypatch, name: str, files: dict[str, Path]) -> None:
    """Registers ``{url: served file}`` as the builder's known downloads (size, sha256)."""
    infos = {
        url: tfds.core.download.checksums.UrlInfo(
            size=path.stat().st_size,
            checksum=hashlib.sha256(path.read_bytes()).hexdigest(),
            filename=path.name,
        )
        for url, path in files.items()
    }
    monkeypatch.setattr(tfds.builder_cls(name), "url_infos", infos)


def builder_module(name: str):
    return sys.modules[tfds.builder_cls(name).__module__]


def serve_mnist(www: Path, base: str, monkeypatch, n_train=48, n_test=24, builder="mnist"):
    rng = np.random.default_rng(0)
    arrays, files = {}, {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, a in (("images-idx3", x), ("labels-idx1", y)):
            name = f"{prefix}-{kind}-ubyte.gz"
            write_idx(www / name, a)
            files[base + name] = www / name
        arrays[prefix] = (x, y)
    module = builder_module(builder)  # MNIST's module also holds Fashion-MNIST's builder
    monkeypatch.setattr(tfds.builder_cls(builder), "URL", base)
    monkeypatch.setattr(module, "_TRAIN_EXAMPLES", n_train)
    monkeypatch.setattr(module, "_TEST_EXAMPLES", n_test)
    register(monkeypatch, builder, files)
    return arrays


def pairs(x: np.ndarray, y: np.ndarray) -> list[tuple[int, bytes]]:
    """Examples as a sorted list: TFDS stores them in the order of a key hash."""
    return sorted((int(label), img.tobytes()) for img, label in zip(x, y, strict=True))


@pytest.mark.e2e  # TFDS prepares a dataset
def test_mnist_downloads_prepares_and_reads_through_tfds(tmp_path, server, monkeypatch):
    www, base = server
    arrays = serve_mnist(www, base, monkeypatch)
    tfds_dir = tmp_path / "tfds"
    data = preset("mnist", source="tfds", tfds_data_dir=str(tfds_dir), val_fraction=0.0)
    assert data.source == "TFDS download"
    assert data.train.x.shape == (48, 28, 28, 1) and data.test.x.shape == (24, 28, 28, 1)
    for split, prefix in ((data.train, "train"), (data.test, "t10k")):
        x, y = arrays[prefix]
        assert pairs(np.asarray(split.x)[..., 0], np.asarray(split.y)) == pairs(x, y)
    assert (tfds_dir / "mnist").is_dir()
    # Prepared now: the next load reads it without the server.
    again = preset("mnist", tfds_data_dir=str(tfds_dir), download=False, val_fraction=0.0)
    assert again.source.startswith("TFDS data dir") and again.test.size == 24
    # A dry run finds it too, and its sizes, from dataset_info.json alone.
    where = located("dataset=mnist", f"dataset.tfds_data_dir={tfds_dir}", "dataset.val_fraction=0")
    assert where.source == again.source and where.sizes == {"train": 48, "val": 0, "test": 24}


def test_a_subset_is_the_same_from_the_idx_files_and_from_tfds(tmp_path, server, monkeypatch):
    # experiment=fmnist_small's reference posterior is of dataset.subset=2000: it must be
    # the same examples, and the same validation split, whichever source has the data.
    www, base = server
    arrays = serve_mnist(www, base, monkeypatch, builder="fashion_mnist")
    tfds_dir = str(tmp_path / "tfds")
    split = {"subset": 20, "val_fraction": 0.25}
    from_tfds = preset("fashion_mnist", source="tfds", tfds_data_dir=tfds_dir, **split)
    from_idx = preset("fashion_mnist", data_dir=str(www), **split)
    assert from_tfds.source == "TFDS download" and from_idx.source.startswith("local files")
    for a, b in ((from_tfds.train, from_idx.train), (from_tfds.val, from_idx.val)):
        np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
        np.testing.assert_array_equal(np.asarray(a.y), np.asarray(b.y))
    assert from_idx.train.size == 15 and from_idx.val.size == 5
    # ... although TFDS stores the examples in another order than the IDX files
    stored = preset("fashion_mnist", source="tfds", tfds_data_dir=tfds_dir, val_fraction=0.0)
    x, y = arrays["train"]
    assert not np.array_equal(np.asarray(stored.train.x)[..., 0], x)
    assert pairs(np.asarray(stored.train.x)[..., 0], np.asarray(stored.train.y)) == pairs(x, y)
    # and the subset is made of the served examples
    chosen = pairs(np.asarray(from_idx.train.x)[..., 0], np.asarray(from_idx.train.y))
    assert set(chosen) <= set(pairs(x, y))


def serve_cifar10(www: Path, base: str, monkeypatch, per_batch=6):
    """CIFAR-10's binary archive, as TFDS downloads it: records of 1 label byte and
    3072 image bytes (channel-major) in ``cifar-10-batches-bin/*.bin``."""
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    images = {}
    archive = www / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:

        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for name in names:
            x = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
            y = rng.integers(0, 10, size=per_batch, dtype=np.uint8)
            chw = x.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
            add(name, np.concatenate([y[:, None], chw], axis=1).tobytes())
            images[name] = (x, y)
        add("batches.meta.txt", "\n".join(f"class{i}" for i in range(10)).encode() + b"\n")
    module = builder_module("cifar10")
    real = module.Cifar10._cifar_info.fget
    url = base + archive.name
    monkeypatch.setattr(
        module.Cifar10, "_cifar_info", property(lambda s: real(s)._replace(url=url))
    )
    register(monkeypatch, "cifar10", {url: archive})
    return images


def test_cifar10_downloads_prepares_and_reads_through_tfds(tmp_path, server, monkeypatch):
    www, base = server
    images = serve_cifar10(www, base, monkeypatch)
    data = preset("cifar10", source="tfds", tfds_data_dir=str(tmp_path / "tfds"), val_fraction=0.0)
    assert data.train.x.shape == (30, 32, 32, 3) and data.test.x.shape == (6, 32, 32, 3)
    train = [images[f"data_batch_{i}.bin"] for i in range(1, 6)]
    expected = pairs(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]))
    assert pairs(np.asarray(data.train.x), np.asarray(data.train.y)) == expected
    assert pairs(np.asarray(data.test.x), np.asarray(data.test.y)) == pairs(
        *images["test_batch.bin"]
    )


def serve_cifar100(www: Path, base: str, monkeypatch, n_train=12, n_test=6):
    """CIFAR-100's binary archive, as TFDS downloads it: records of 2 label bytes (coarse,
    fine) and 3072 image bytes (channel-major) in ``cifar-100-binary/{train,test}.bin``,
    with the two label-name files."""
    rng = np.random.default_rng(3)
    images = {}
    archive = www / "cifar-100-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:

        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(f"cifar-100-binary/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for split, n in (("train", n_train), ("test", n_test)):
            x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
            fine = rng.integers(0, 100, size=n, dtype=np.uint8)
            coarse = fine // 5  # any 0..19: TFDS keeps it apart from the label
            chw = x.transpose(0, 3, 1, 2).reshape(n, 3072)
            add(f"{split}.bin", np.concatenate([coarse[:, None], fine[:, None], chw], 1).tobytes())
            images[split] = (x, fine)
        add("coarse_label_names.txt", "\n".join(f"c{i}" for i in range(20)).encode() + b"\n")
        add("fine_label_names.txt", "\n".join(f"f{i}" for i in range(100)).encode() + b"\n")
    module = builder_module("cifar100")
    real = module.Cifar100._cifar_info.fget
    url = base + archive.name
    monkeypatch.setattr(
        module.Cifar100, "_cifar_info", property(lambda s: real(s)._replace(url=url))
    )
    register(monkeypatch, "cifar100", {url: archive})
    return images


@pytest.mark.e2e  # TFDS prepares a dataset
def test_cifar100_downloads_prepares_and_reads_through_tfds(tmp_path, server, monkeypatch):
    www, base = server
    images = serve_cifar100(www, base, monkeypatch)
    tfds_dir = tmp_path / "tfds"
    data = preset("cifar100", source="tfds", tfds_data_dir=str(tfds_dir), val_fraction=0.0)
    assert data.source == "TFDS download" and data.spec.num_classes == 100
    assert data.train.x.shape == (12, 32, 32, 3) and data.test.x.shape == (6, 32, 32, 3)
    for split, name in ((data.train, "train"), (data.test, "test")):  # the fine labels
        assert pairs(np.asarray(split.x), np.asarray(split.y)) == pairs(*images[name])
    where = located(
        "dataset=cifar100", f"dataset.tfds_data_dir={tfds_dir}", "dataset.val_fraction=0"
    )
    assert where.source.startswith("TFDS data dir") and where.sizes["test"] == 6


def serve_svhn(www: Path, base: str, monkeypatch, sizes=(("train", 10), ("test", 6), ("extra", 4))):
    """SVHN's three MATLAB v5 files, as TFDS downloads them (it takes ``extra`` too): ``X``
    (32, 32, 3, N) uint8 and ``y`` (N, 1) double in 1..10, 10 for the digit 0."""
    import scipy.io

    rng = np.random.default_rng(4)
    arrays, files = {}, {}
    for split, n in sizes:
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.arange(n) % 10 + 1.0  # every label, 10 among them
        name = f"{split}_32x32.mat"
        scipy.io.savemat(www / name, {"X": x, "y": y[:, None]})
        files[base + name] = www / name
        arrays[split] = (np.moveaxis(x, -1, 0), (y % 10).astype(int))
    monkeypatch.setattr(builder_module("svhn_cropped"), "URL", base)
    register(monkeypatch, "svhn_cropped", files)
    return arrays


@pytest.mark.e2e  # TFDS prepares a dataset
def test_svhn_downloads_prepares_and_reads_through_tfds(tmp_path, server, monkeypatch):
    www, base = server
    arrays = serve_svhn(www, base, monkeypatch)
    tfds_dir = tmp_path / "tfds"
    data = preset("svhn", source="tfds", tfds_data_dir=str(tfds_dir), val_fraction=0.0)
    assert data.source == "TFDS download"
    assert data.train.x.shape == (10, 32, 32, 3) and data.test.x.shape == (6, 32, 32, 3)
    assert 0 in np.asarray(data.train.y) and 10 not in np.asarray(data.train.y)  # 10 -> 0
    for split, name in ((data.train, "train"), (data.test, "test")):
        assert pairs(np.asarray(split.x), np.asarray(split.y)) == pairs(*arrays[name])
    # the same examples from the same files read as local files (the data_dir path)
    local = preset("svhn", data_dir=str(www), val_fraction=0.0)
    for a, b in ((data.train, local.train), (data.test, local.test)):
        assert pairs(np.asarray(a.x), np.asarray(a.y)) == pairs(np.asarray(b.x), np.asarray(b.y))
    where = located("dataset=svhn", f"dataset.tfds_data_dir={tfds_dir}", "dataset.val_fraction=0")
    assert where.source.startswith("TFDS data dir") and where.sizes["train"] == 10


def test_svhn_offline_ends_in_one_actionable_message(tmp_path, monkeypatch, run_cli):
    """`bnn-bench dataset=svhn` without network, files or TFDS cache: the CLI exits 2
    with one message that says where the files are published, where to put them and
    which key to set; nothing is downloaded or left behind."""
    url = closed_port_url() + "train_32x32.mat"
    info = tfds.core.download.checksums.UrlInfo(size=1, checksum="0" * 64, filename="t.mat")
    monkeypatch.setattr(tfds.builder_cls("svhn_cropped"), "url_infos", {url: info})
    proc = run_cli("dataset=svhn", "model=mlp", "method=map")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bnn-bench: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    msg = proc.stderr[proc.stderr.index("bnn-bench: error:") :]
    assert "Could not download dataset 'svhn'" in msg and "cannot reach 127.0.0.1" in msg
    assert "train_32x32.mat and test_32x32.mat" in msg and "dataset.data_dir=PATH" in msg
    assert "http://ufldl.stanford.edu/housenumbers/" in msg  # where to get them
    assert "tfds build svhn_cropped" in msg and "dataset.tfds_data_dir=DIR" in msg
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "tfds").exists()


def test_cifar10_corrupted_downloads_prepares_and_reads_through_tfds(tmp_path, server, monkeypatch):
    """The eval shift's CIFAR-10-C path: ``CIFAR-10-C.tar`` holds one .npy per corruption
    (5 severities stacked) and ``labels.npy`` (the labels, 5 times); here only fog's."""
    from bnn_bench.evaluation.shift import load_cifar10_corrupted

    www, base = server
    rng = np.random.default_rng(2)
    n = 8
    fog = rng.integers(0, 256, size=(5 * n, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(rng.integers(0, 10, size=n, dtype=np.uint8), 5)
    archive = www / "CIFAR-10-C.tar"
    with tarfile.open(archive, "w") as tar:
        for name, a in (("fog.npy", fog), ("labels.npy", labels)):
            buf = io.BytesIO()
            np.save(buf, a)
            info = tarfile.TarInfo(f"CIFAR-10-C/{name}")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    url = base + archive.name
    monkeypatch.setattr(builder_module("cifar10_corrupted"), "_DOWNLOAD_URL", url)
    register(monkeypatch, "cifar10_corrupted", {url: archive})
    x, y = load_cifar10_corrupted("cifar10c_fog", 2, str(tmp_path / "tfds"), download=True)
    assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
    assert pairs(x, y) == pairs(fog[n : 2 * n], labels[:n])  # severity 2: the second block


def closed_port_url() -> str:
    """A loopback URL nothing listens on: connections are refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_no_network_fails_fast_with_one_message_and_leaves_nothing(tmp_path, monkeypatch):
    """As without network: the download host does not answer. The run stops within
    seconds (TFDS alone retries for minutes), says what to do, and leaves no folders."""
    base = closed_port_url()
    module = builder_module("mnist")
    monkeypatch.setattr(module.MNIST, "URL", base)
    info = tfds.core.download.checksums.UrlInfo(size=1, checksum="0" * 64, filename="t10k")
    monkeypatch.setattr(tfds.builder_cls("mnist"), "url_infos", {base + "t10k": info})
    tfds_dir = tmp_path / "tfds"
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        preset("mnist", tfds_data_dir=str(tfds_dir))
    assert time.monotonic() - start < 30
    msg = str(e.value)
    assert "Could not download dataset 'mnist'" in msg and "cannot reach 127.0.0.1" in msg
    assert "dataset.data_dir=PATH" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert "tfds build mnist" in msg and "dataset.tfds_data_dir=DIR" in msg
    assert "dataset.download=true" not in msg  # it is true already
    assert not tfds_dir.exists()


def test_a_dry_run_probes_the_download_as_the_run_does(tmp_path, monkeypatch):
    """`bnn-bench dry_run=true method=psgld dataset=cifar10` without network: the dry run
    makes the run's reachability probe and stops with the run's message (it exited 0)."""
    from bnn_bench.run import run
    from tests.conftest import compose_cfg

    url = closed_port_url() + "cifar-10-binary.tar.gz"
    info = tfds.core.download.checksums.UrlInfo(size=1, checksum="0" * 64, filename="c.tar.gz")
    monkeypatch.setattr(tfds.builder_cls("cifar10"), "url_infos", {url: info})
    tfds_dir = tmp_path / "tfds"
    messages = []
    for dry in ("true", "false"):
        cfg = compose_cfg("method=psgld", "dataset=cifar10", f"dry_run={dry}",
                          f"dataset.tfds_data_dir={tfds_dir}")  # fmt: skip
        with pytest.raises(UserError) as e:
            run(cfg, tmp_path / "run")
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert "Could not download dataset 'cifar10'" in messages[0]
    assert "cannot reach 127.0.0.1" in messages[0] and "dataset.data_dir=PATH" in messages[0]
    assert not tfds_dir.exists() and not (tmp_path / "run").exists()


def test_failed_download_removes_only_what_it_created(tmp_path, server, monkeypatch):
    """The host answers but one file is missing (HTTP 404): TFDS fails mid-download. Its
    temporary files and new empty folders go; an older file in the data dir stays."""
    www, base = server
    serve_mnist(www, base, monkeypatch)
    (www / "t10k-labels-idx1-ubyte.gz").unlink()
    tfds_dir = tmp_path / "tfds"
    (tfds_dir / "downloads").mkdir(parents=True)
    (tfds_dir / "downloads" / "older.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="Could not download dataset 'mnist'"):
        preset("mnist", source="tfds", tfds_data_dir=str(tfds_dir))
    left = sorted(str(p.relative_to(tfds_dir)) for p in tfds_dir.rglob("*"))
    assert not any(".tmp." in p for p in left), left
    assert not [p for p in tfds_dir.rglob("*") if p.is_dir() and not any(p.iterdir())], left
    assert "downloads/older.bin" in left


def test_cifar10_corrupted_without_network_fails_fast_and_leaves_nothing(tmp_path, monkeypatch):
    from bnn_bench.evaluation.shift import load_cifar10_corrupted

    url = closed_port_url() + "CIFAR-10-C.tar"
    monkeypatch.setattr(builder_module("cifar10_corrupted"), "_DOWNLOAD_URL", url)
    info = tfds.core.download.checksums.UrlInfo(size=1, checksum="0" * 64, filename="x.tar")
    monkeypatch.setattr(tfds.builder_cls("cifar10_corrupted"), "url_infos", {url: info})
    tfds_dir = tmp_path / "tfds"
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        load_cifar10_corrupted("cifar10c_fog", 1, str(tfds_dir), download=True)
    assert time.monotonic() - start < 30
    msg = str(e.value)
    assert "could not download cifar10_corrupted/fog_1: cannot reach 127.0.0.1" in msg
    assert "tfds build cifar10_corrupted/fog_1" in msg and "eval.tfds_data_dir=DIR" in msg
    assert "eval.download=true" not in msg
    assert not tfds_dir.exists()
