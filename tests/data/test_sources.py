"""Readers on files written here in the real formats, TFDS through its own mock, and
the order in which sources are tried."""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile

import numpy as np
import pytest

from bnn_bench.data import load
from bnn_bench.data.sources import read_cifar10_folder, read_idx, read_idx_folder
from bnn_bench.errors import UserError


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    """Writes LeCun's IDX format: magic (0, 0, dtype 0x08, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_idx_folder(folder, n_train=120, n_test=40, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y, gz)
        arrays[prefix] = (x, y)
    return arrays


def make_cifar_batches(folder, per_batch=20, seed=0):
    """CIFAR-10's python pickles: {b'data': (n, 3072) uint8 channel-major, b'labels': [..]}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        img = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        data = img.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        images[name] = (img, np.asarray(labels))
    return images


def test_idx_roundtrip_gz_and_raw(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", x, gz=True)
    write_idx(tmp_path / "b", x, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), x)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), x)


def test_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    x = np.zeros((4, 5), np.uint8)
    write_idx(tmp_path / "short", x, gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_reader(tmp_path, gz):
    arrays = make_idx_folder(tmp_path, gz=gz)
    out = read_idx_folder(tmp_path)
    assert out["train"][0].shape == (120, 28, 28, 1) and out["train"][0].dtype == np.uint8
    np.testing.assert_array_equal(out["train"][0][..., 0], arrays["train"][0])
    np.testing.assert_array_equal(out["test"][1], arrays["t10k"][1])


def test_cifar10_folder_subfolder_and_archive(tmp_path):
    images = make_cifar_batches(tmp_path / "cifar-10-batches-py")
    for where in (tmp_path / "cifar-10-batches-py", tmp_path):
        out = read_cifar10_folder(where)
        assert out["train"][0].shape == (100, 32, 32, 3)
        np.testing.assert_array_equal(out["train"][0][:20], images["data_batch_1"][0])
        np.testing.assert_array_equal(out["test"][0], images["test_batch"][0])
        np.testing.assert_array_equal(out["test"][1], images["test_batch"][1])
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    with tarfile.open(archive_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    out = read_cifar10_folder(archive_dir)
    np.testing.assert_array_equal(out["train"][0][-20:], images["data_batch_5"][0])


def test_load_local_mnist_family_with_validation(tmp_path):
    arrays = make_idx_folder(tmp_path)
    data = load("mnist", source="local", data_dir=str(tmp_path), val_fraction=0.25)
    assert (data.train.size, data.val.size, data.test.size) == (90, 30, 40)
    assert data.train.x.dtype == np.uint8 and data.train.x.shape[1:] == (28, 28, 1)
    # train + val are exactly the original training set, no example lost or repeated
    together = np.concatenate([np.asarray(data.train.x), np.asarray(data.val.x)])
    original = arrays["train"][0][..., None]
    assert sorted(map(bytes, together)) == sorted(map(bytes, original))
    # half of the test split validates, as in the JaxSGMC tutorial
    half = load("mnist", source="local", data_dir=str(tmp_path), val_from="test", val_fraction=0.5)
    assert (half.train.size, half.val.size, half.test.size) == (120, 20, 20)


def test_load_local_cifar10(tmp_path):
    make_cifar_batches(tmp_path)
    data = load("cifar10", data_dir=str(tmp_path), download=False, val_fraction=0.0)
    assert data.val is None and data.train.x.shape == (100, 32, 32, 3)
    assert data.spec.input_shape == (32, 32, 3) and "local files" in data.source


def test_missing_data_without_download_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(UserError) as e:
        load("cifar10", data_dir=str(tmp_path / "nowhere"), download=False)
    msg = str(e.value)
    assert "Could not find dataset 'cifar10'" in msg and "dataset.data_dir" in msg
    assert "nowhere" in msg


def test_wrong_shape_files_are_rejected(tmp_path):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, size=(8, 32, 32), dtype=np.uint8),
        )
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(8, np.uint8))
    with pytest.raises(UserError, match=r"shape \(32, 32, 1\), expected \(28, 28, 1\)"):
        load("mnist", source="local", data_dir=str(tmp_path))


def test_tfds_source_through_tfds_mock(tmp_path):
    """TFDS's own testing facility replaces download and reading with random examples of
    the real feature spec; our reader must turn them into the usual arrays."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        data = load(
            "fashion_mnist",
            source="tfds",
            tfds_data_dir=str(tmp_path),
            download=True,
            val_fraction=0.25,
        )
    assert data.source == "TFDS download"
    assert data.train.x.shape == (18, 28, 28, 1) and data.val.size == 6
    assert data.test.x.shape == (24, 28, 28, 1) and data.test.x.dtype == np.uint8
    assert int(data.train.y.max()) < 10
    with tfds.testing.mock_data(num_examples=8):
        cifar = load("cifar10", source="tfds", tfds_data_dir=str(tmp_path), val_fraction=0.0)
    assert cifar.train.x.shape == (8, 32, 32, 3)


def test_unknown_dataset_and_source():
    with pytest.raises(UserError, match="Unknown dataset 'imagenet'"):
        load("imagenet")
    with pytest.raises(UserError, match="dataset.source must be one of"):
        load("mnist", source="ftp")
