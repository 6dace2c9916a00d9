"""Readers on files written here in the real formats, through the dataset YAMLs; the
order in which sources are tried; one clear error for each way the files can be wrong.

The TFDS download path itself is tested in ``test_tfds_download.py``."""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile

import numpy as np
import pytest

from bnn_bench.data import preset
from bnn_bench.data.files import read_idx
from bnn_bench.errors import UserError

pytestmark = pytest.mark.unit


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


def test_idx_rejects_bad_magic_and_short_payload(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(UserError, match=r"bad is not an IDX file .* Re-download it"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 5), np.uint8), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(UserError, match=r"short is truncated: its header says \(4, 5\)"):
        read_idx(tmp_path / "short")


def test_truncated_gz_names_the_file_and_what_to_do(tmp_path):
    make_idx_folder(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-40])
    with pytest.raises(UserError) as e:
        preset("mnist", data_dir=str(tmp_path))
    msg = str(e.value)
    assert f"{bad} is truncated or corrupt" in msg and "Re-download it or replace it" in msg
    assert e.value.__cause__ is None  # one message, not a wrapped EOFError


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_data_dir(tmp_path, gz):
    arrays = make_idx_folder(tmp_path, gz=gz)
    data = preset("mnist", data_dir=str(tmp_path), val_fraction=0.0)
    assert data.source == f"local files in {tmp_path}"
    assert data.train.x.shape == (120, 28, 28, 1) and data.train.x.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(data.train.x)[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(np.asarray(data.test.y), arrays["t10k"][1])
    assert data.spec.class_names == tuple("0123456789") and data.spec.mean == (0.1307,)


def test_cifar10_from_batches_subfolder_and_archive(tmp_path):
    images = make_cifar_batches(tmp_path / "cifar-10-batches-py")
    for where in (tmp_path / "cifar-10-batches-py", tmp_path):
        data = preset("cifar10", data_dir=str(where), val_fraction=0.0)
        assert data.train.x.shape == (100, 32, 32, 3)
        np.testing.assert_array_equal(np.asarray(data.train.x)[:20], images["data_batch_1"][0])
        np.testing.assert_array_equal(np.asarray(data.test.x), images["test_batch"][0])
        np.testing.assert_array_equal(np.asarray(data.test.y), images["test_batch"][1])
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    with tarfile.open(archive_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = preset("cifar10", data_dir=str(archive_dir), val_fraction=0.0)
    np.testing.assert_array_equal(np.asarray(data.train.x)[-20:], images["data_batch_5"][0])
    assert data.spec.input_shape == (32, 32, 3) and data.spec.class_names[0] == "airplane"


def test_truncated_cifar_archive_names_the_file(tmp_path):
    make_cifar_batches(tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "a" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError, match=f"{archive} is truncated or corrupt"):
        preset("cifar10", data_dir=str(archive.parent))


def test_validation_carved_from_train_or_test(tmp_path):
    arrays = make_idx_folder(tmp_path)
    data = preset("mnist", data_dir=str(tmp_path), val_fraction=0.25)
    assert (data.train.size, data.val.size, data.test.size) == (90, 30, 40)
    # train + val are exactly the original training set, no example lost or repeated
    together = np.concatenate([np.asarray(data.train.x), np.asarray(data.val.x)])
    original = arrays["train"][0][..., None]
    assert sorted(map(bytes, together)) == sorted(map(bytes, original))
    # half of the test split validates, as in the JaxSGMC tutorial
    half = preset("mnist", data_dir=str(tmp_path), val_from="test", val_fraction=0.5)
    assert (half.train.size, half.val.size, half.test.size) == (120, 20, 20)


def test_missing_data_dir_is_an_error_not_a_fallback(tmp_path):
    """A data_dir the user names is the source: Fashion-MNIST's system copy (when
    installed) must not be used instead."""
    with pytest.raises(UserError) as e:
        preset("fashion_mnist", data_dir=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert f"dataset.data_dir={tmp_path / 'nowhere'} does not exist" in msg
    assert "train-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg


def test_data_dir_without_test_files_names_them(tmp_path):
    make_idx_folder(tmp_path)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).unlink()
    with pytest.raises(UserError) as e:
        preset("fashion_mnist", data_dir=str(tmp_path))
    assert str(e.value).startswith(
        f"dataset.data_dir={tmp_path} lacks t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz."
    )
    make_cifar_batches(tmp_path / "c")
    (tmp_path / "c" / "test_batch").unlink()
    with pytest.raises(UserError, match=r"c lacks test_batch\. It should hold cifar-10-python"):
        preset("cifar10", data_dir=str(tmp_path / "c"))


def test_nothing_found_without_download_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(UserError) as e:
        preset("cifar10", download=False)
    msg = str(e.value)
    assert msg.startswith("Could not find dataset 'cifar10' (dataset.source=auto, dataset.down")
    assert f"no cifar10 folder in {tmp_path / 'tfds'}" in msg
    assert "dataset.download=true" in msg and "cifar-10-python.tar.gz" in msg
    assert "dataset.tfds_data_dir" in msg
    with pytest.raises(UserError, match="dataset.source=local needs dataset.data_dir=PATH"):
        preset("mnist", source="local")


def test_wrong_shape_files_are_rejected(tmp_path):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, size=(8, 32, 32), dtype=np.uint8),
        )
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(8, np.uint8))
    with pytest.raises(UserError, match=r"shape \(32, 32, 1\), expected \(28, 28, 1\)"):
        preset("mnist", data_dir=str(tmp_path))


def test_unknown_dataset_and_source():
    with pytest.raises(
        UserError, match="Unknown dataset .imagenet.. Known: cifar10, cifar100, diabetes, fashion"
    ):
        preset("imagenet")
    with pytest.raises(UserError, match="dataset.source: expected one of 'auto', 'local'"):
        preset("mnist", source="ftp")


def located(*overrides: str):
    """What a dry run does: the config checked, then the dataset's ``locate()``."""
    from bnn_bench.config import build, validate
    from tests.conftest import compose_cfg

    cfg = compose_cfg(*overrides)
    validate(cfg)
    return build(cfg.dataset, "dataset").locate()


@pytest.mark.parametrize(
    "split", [[], ["dataset.subset=50", "dataset.val_fraction=0.2"], ["dataset.val_from=test"]]
)
def test_locate_agrees_with_load_without_reading(tmp_path, split):
    make_idx_folder(tmp_path)
    overrides = ["dataset=mnist", f"dataset.data_dir={tmp_path}", *split]
    where = located(*overrides)
    from bnn_bench.config import build
    from tests.conftest import compose_cfg

    data = build(compose_cfg(*overrides).dataset, "dataset").load()
    assert where.source == data.source and where.spec == data.spec
    assert where.sizes == {"train": data.train.size, "val": data.val.size, "test": data.test.size}


def test_locate_synthetic_and_cifar(tmp_path):
    from bnn_bench.data import SyntheticDataset

    data = SyntheticDataset(train_size=100, test_size=30, val_from="test", val_fraction=0.5).load()
    where = located("dataset=synthetic", "dataset.train_size=100", "dataset.test_size=30",
                    "dataset.val_from=test", "dataset.val_fraction=0.5")  # fmt: skip
    assert where.sizes == {"train": data.train.size, "val": data.val.size, "test": data.test.size}
    assert where.spec == data.spec
    make_cifar_batches(tmp_path)
    cifar = located("dataset=cifar10", f"dataset.data_dir={tmp_path}")
    # the pickles' sizes are not read: the published ones (stored.PUBLISHED)
    assert cifar.source == f"local files in {tmp_path}"
    assert cifar.sizes == {"train": 45_000, "val": 5_000, "test": 10_000}


def test_locate_refuses_what_load_refuses(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        located("dataset=mnist", f"dataset.data_dir={tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match=r"dataset.val_fraction must be in \[0, 1\), got 1.5"):
        located("dataset=mnist", "dataset.val_fraction=1.5")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="Could not find dataset 'mnist'"):
        located("dataset=mnist", "dataset.download=false")


def test_locate_a_download_without_tensorflow(tmp_path):
    """A dry run of a dataset TFDS would download: named as such, its host probed as the
    run probes it (here a loopback server stands for CIFAR-10's), in a process that never
    imports TensorFlow (seconds per job in a sweep)."""
    import subprocess
    import sys

    from tests.conftest import cli_env

    code = (
        "import functools, http.server, sys, threading\n"
        "import tensorflow_datasets as tfds\n"
        "from tests.data.test_sources import located\n"
        "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory='.')\n"
        "httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)\n"
        "threading.Thread(target=httpd.serve_forever, daemon=True).start()\n"
        "url = f'http://127.0.0.1:{httpd.server_address[1]}/cifar.tar.gz'\n"
        "tfds.builder_cls('cifar10').url_infos = {url: None}\n"
        f"w = located('dataset=cifar10', 'dataset.tfds_data_dir={tmp_path}')\n"
        "print(w.source, w.sizes, 'tensorflow' in sys.modules)\n"
    )
    env = {**cli_env(), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a download's sizes are CIFAR-10's published ones (stored.PUBLISHED)
    sizes = {"train": 45_000, "val": 5_000, "test": 10_000}
    assert proc.stdout.strip().splitlines()[-1] == f"TFDS download {sizes} False"
