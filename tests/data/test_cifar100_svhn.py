"""CIFAR-100's python archive and SVHN's MATLAB files, written here in their published
formats and read through the dataset YAMLs (``dataset.data_dir``); SVHN as the OOD set
of a CIFAR-shaped run. The TFDS paths are in ``test_tfds_download.py``."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import scipy.io

from bnn_bench.data import preset
from bnn_bench.errors import UserError
from tests.data.test_sources import located

pytestmark = pytest.mark.unit


def write_cifar100(folder, n_train=14, n_test=6, seed=0, archive=True):
    """``cifar-100-python.tar.gz`` as published: ``cifar-100-python/{train,test,meta}``,
    pickles with ``data`` (n, 3072) channel-major, ``fine_labels`` and ``coarse_labels``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    blobs, arrays = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n)
        coarse = (fine + 7) % 20  # differs from fine: the reader must take fine_labels
        blobs[split] = pickle.dumps(
            {
                b"filenames": [f"{i}.png".encode() for i in range(n)],
                b"batch_label": split.encode(),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": coarse.tolist(),
                b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072),
            }
        )
        arrays[split] = (x, fine)
    blobs["meta"] = pickle.dumps({b"fine_label_names": [b"apple"] * 100})
    if archive:
        with tarfile.open(folder / "cifar-100-python.tar.gz", "w:gz") as tar:
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (folder / "cifar-100-python").mkdir()
        for name, blob in blobs.items():
            (folder / "cifar-100-python" / name).write_bytes(blob)
    return arrays


def write_svhn(folder, n_train=12, n_test=7, seed=0, labels=None):
    """``train_32x32.mat`` / ``test_32x32.mat``: MATLAB v5, ``X`` (32, 32, 3, N) uint8 and
    ``y`` (N, 1) double in 1..10, 10 for the digit 0. Returns the expected (N, 32, 32, 3)
    images and 0..9 labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.arange(n) % 10 + 1.0 if labels is None else np.asarray(labels, float)
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y[:, None]})
        out[split] = (np.stack([x[..., i] for i in range(n)]), np.where(y == 10, 0, y))
    return out


@pytest.mark.parametrize("archive", [True, False])
def test_cifar100_reads_the_fine_labels_from_the_archive_or_its_folder(tmp_path, archive):
    arrays = write_cifar100(tmp_path, archive=archive)
    data = preset("cifar100", data_dir=str(tmp_path), val_fraction=0.0)
    assert data.spec.num_classes == 100 and len(set(data.spec.class_names)) == 100
    assert data.spec.class_names[:2] == ("apple", "aquarium_fish")
    assert data.spec.class_names[-1] == "worm"
    for split, name in ((data.train, "train"), (data.test, "test")):
        x, y = arrays[name]
        np.testing.assert_array_equal(np.asarray(split.x), x)
        np.testing.assert_array_equal(np.asarray(split.y), y)


def test_cifar100_missing_or_broken_archive_says_which(tmp_path):
    lacks = r"lacks cifar-100-python.tar.gz\. It should hold cifar-100-python.tar.gz \(from http"
    with pytest.raises(UserError, match=lacks):
        preset("cifar100", data_dir=str(tmp_path))
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="cifar-100-python.tar.gz is truncated or corrupt"):
        preset("cifar100", data_dir=str(tmp_path))


def test_svhn_reads_the_mat_files_with_10_as_digit_0(tmp_path):
    arrays = write_svhn(tmp_path)
    data = preset("svhn", data_dir=str(tmp_path), val_fraction=0.0)
    assert data.train.x.shape == (12, 32, 32, 3) and data.train.x.dtype == np.uint8
    for split, name in ((data.train, "train"), (data.test, "test")):
        x, y = arrays[name]
        np.testing.assert_array_equal(np.asarray(split.x), x)  # image i is X[:, :, :, i]
        np.testing.assert_array_equal(np.asarray(split.y), y)
    assert np.asarray(data.train.y)[9] == 0  # the file's label 10
    # a dry run's sizes come from the files' headers alone
    where = located("dataset=svhn", f"dataset.data_dir={tmp_path}", "dataset.val_fraction=0.25")
    assert where.sizes == {"train": 9, "val": 3, "test": 7}
    assert where.source == data.source


def test_svhn_bad_files_are_named(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(UserError, match=r"lacks test_32x32.mat\. It should hold train_32x32"):
        preset("svhn", data_dir=str(tmp_path))
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(UserError, match=r"test_32x32.mat is not a readable MATLAB file"):
        preset("svhn", data_dir=str(tmp_path))
    write_svhn(tmp_path, n_train=3, n_test=3, labels=[0, 1, 2])  # 0 is not an SVHN label
    with pytest.raises(UserError, match=r"labels .* in \[0, 2\] \(SVHN's are 1 to 10\)"):
        preset("svhn", data_dir=str(tmp_path))


def test_svhn_is_the_ood_set_of_a_cifar_run(tmp_path):
    """``dataset=cifar10 dataset@eval.ood_dataset=svhn``, on tiny files: the run's OOD set
    is SVHN's test split as stored, and the dry run counts it from the files' headers."""
    from bnn_bench.data.resolve import resolve
    from bnn_bench.dry_run import set_sizes
    from bnn_bench.evaluation.sets import evaluation_sets
    from bnn_bench.parts import Parts
    from tests.conftest import compose_cfg
    from tests.data.test_sources import make_cifar_batches

    make_cifar_batches(tmp_path / "cifar", per_batch=4)
    svhn = write_svhn(tmp_path / "svhn", n_train=4, n_test=11)
    parts = Parts.of(
        compose_cfg(
            "dataset=cifar10",
            f"dataset.data_dir={tmp_path / 'cifar'}",
            "dataset@eval.ood_dataset=svhn",
            f"eval.ood_dataset.data_dir={tmp_path / 'svhn'}",
        )  # fmt: skip
    )
    sets = evaluation_sets(parts.dataset.load(), parts.settings)
    np.testing.assert_array_equal(np.asarray(sets["ood"].x), svhn["test"][0])
    assert set_sizes(resolve(parts.dataset), parts.settings)["ood"] == 11


def test_a_missing_ood_set_names_the_ood_keys(tmp_path, monkeypatch):
    """Without files, ``dataset@eval.ood_dataset=svhn`` says where SVHN's files go: under
    ``eval.ood_dataset``, not the run's own ``dataset`` keys; the dry run says the same."""
    from bnn_bench.data.resolve import resolve
    from bnn_bench.dry_run import set_sizes
    from bnn_bench.evaluation.sets import evaluation_sets
    from bnn_bench.parts import Parts
    from tests.conftest import compose_cfg
    from tests.data.test_sources import make_cifar_batches

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    make_cifar_batches(tmp_path / "cifar", per_batch=4)
    parts = Parts.of(
        compose_cfg(
            "dataset=cifar10",
            f"dataset.data_dir={tmp_path / 'cifar'}",
            "dataset@eval.ood_dataset=svhn",
            "eval.ood_dataset.download=false",
        )  # fmt: skip
    )
    messages = []
    for build_sets in (
        lambda: evaluation_sets(parts.dataset.load(), parts.settings),
        lambda: set_sizes(resolve(parts.dataset), parts.settings),
    ):
        with pytest.raises(UserError) as e:
            build_sets()
        messages.append(str(e.value))
    for msg in messages:  # (what they tried is worded apart: a folder, its metadata)
        assert "Could not find dataset 'svhn' (eval.ood_dataset.source=auto" in msg
        assert "train_32x32.mat and test_32x32.mat" in msg
        assert "pass eval.ood_dataset.data_dir=PATH" in msg
        assert "eval.ood_dataset.download=true" in msg and "eval.ood_dataset.tfds_data_dir" in msg
        assert " dataset.data_dir" not in msg
