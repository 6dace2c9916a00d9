"""A reference predictive given as a file (``eval.reference=<file>``): the vendored copy of the
competition's real ``probs.csv``, the reader's formats and refusals, the order check on
shuffled labels, and agreement / total variation against the competition's own functions."""

from __future__ import annotations

import gzip
import hashlib
import io

import numpy as np
import pytest

from bnn_bench import dry_run
from bnn_bench.config import build
from bnn_bench.errors import UserError
from bnn_bench.evaluation import fidelity
from bnn_bench.evaluation import reference_file as R
from bnn_bench.evaluation.settings import EvalSettings
from bnn_bench.parts import Parts
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg

pytestmark = pytest.mark.unit

# sha256 of data/cifar10/probs.csv in github.com/izmailovpavel/neurips_bdl_starter_kit
PROBS_CSV_SHA256 = "4299e2e90a445fcdc6b20ebfc6f233cb214c1930635c11b3bf9c4b7e1c23b4c6"


# --- the competition's metrics.py (github.com/izmailovpavel/neurips_bdl_starter_kit), verbatim


def agreement(predictions: np.array, reference: np.array):
    """Returns 1 if predictions match and 0 otherwise."""
    return (predictions.argmax(axis=-1) == reference.argmax(axis=-1)).mean()


def total_variation_distance(predictions: np.array, reference: np.array):
    """Returns total variation distance."""
    return np.abs(predictions - reference).sum(axis=-1).mean() / 2.0


# ---


@pytest.fixture(scope="module")
def hmc():
    return R.read(R.vendored("cifar10_hmc_test.npz"), "vendored")


def test_the_vendored_copy_is_the_competitions_probs_csv(hmc):
    """The float32 copy writes the original's bytes again (``%.18e`` of float32 values)."""
    buf = io.BytesIO()
    np.savetxt(buf, hmc.astype(np.float64))
    assert hashlib.sha256(buf.getvalue()).hexdigest() == PROBS_CSV_SHA256
    assert hmc.shape == (10_000, 10) and hmc.dtype == np.float32
    np.testing.assert_allclose(hmc.sum(-1), 1.0, atol=1e-6)
    # CIFAR-10's test set has 1,000 images per class; a ~90%-accurate predictive's argmax
    # counts stay near that (the file's: 964 to 1,035)
    counts = np.bincount(hmc.argmax(-1), minlength=10)
    assert counts.min() > 900 and counts.max() < 1100
    assert np.median(hmc.max(-1)) > 0.9  # HMC is confident on most test images


def test_the_real_file_reads_alike_from_csv_csv_gz_npy_npz(hmc, tmp_path):
    """The competition's text format (as np.savetxt wrote it), gzipped, and NumPy's."""
    rows = hmc[:50]
    text = io.BytesIO()
    np.savetxt(text, rows.astype(np.float64))
    (tmp_path / "probs.csv").write_bytes(text.getvalue())
    (tmp_path / "probs.csv.gz").write_bytes(gzip.compress(text.getvalue()))
    np.save(tmp_path / "probs.npy", rows)
    np.savez(tmp_path / "probs.npz", anything=rows)
    for name in ("probs.csv", "probs.csv.gz", "probs.npy", "probs.npz"):
        got = R.read(tmp_path / name, name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, rows)


@pytest.mark.parametrize(
    ("name", "write", "says"),
    [
        ("missing.csv", None, "no such file"),
        ("logits.npy", lambda p: np.save(p, np.random.randn(20, 10)), "not probabilities"),
        ("flat.npy", lambda p: np.save(p, np.full(10, 0.1)), "of shape (10,)"),
        ("two.npz", lambda p: np.savez(p, a=np.eye(3), b=np.eye(3)), "holds 2 arrays"),
        ("words.csv", lambda p: p.write_text("a b c\n"), "not a readable predictive file"),
    ],
)
def test_a_bad_reference_file_is_refused_in_one_line(tmp_path, name, write, says):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(UserError, match="eval.reference") as err:
        R.read(path, f"eval.reference={path}")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_agreement_and_total_variation_equal_the_competitions(hmc):
    """The run's stable metric names (<set>/agreement, <set>/total_variation) carry exactly
    the competition's numbers: on the real reference against a perturbed copy."""
    rng = np.random.default_rng(0)
    mine = rng.dirichlet(np.ones(10), 10_000).astype(np.float32) * 0.3 + hmc * 0.7
    got = fidelity.fidelity_metrics({"test": mine}, {"test": hmc}, ["test"])
    assert got["test/agreement"] == pytest.approx(float(agreement(mine, hmc)), abs=1e-12)
    assert got["test/total_variation"] == pytest.approx(
        float(total_variation_distance(mine, hmc)), rel=1e-6
    )
    assert 0.5 < got["test/agreement"] < 1.0 and 0.05 < got["test/total_variation"] < 0.5


def _peaked(labels, num_classes=10, accuracy=0.9, seed=0):
    """(N, C) probabilities whose argmax is the label for the first ``accuracy`` share."""
    rng = np.random.default_rng(seed)
    pred = np.array(labels)
    wrong = rng.permutation(len(pred))[: int(round((1 - accuracy) * len(pred)))]
    pred[wrong] = (pred[wrong] + 1 + rng.integers(0, num_classes - 1, len(wrong))) % num_classes
    probs = rng.dirichlet(np.ones(num_classes), len(pred)) * 0.2
    probs[np.arange(len(pred)), pred] += 0.8
    return probs.astype(np.float32)


@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_the_order_check_accepts_aligned_rows_and_refuses_shuffled_ones(num_classes):
    """Rows aligned with the labels pass; the same rows against shuffled labels (a file in
    another order, or another split's) are refused, saying so."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, num_classes, 2000)
    probs = _peaked(labels, num_classes, accuracy=0.8 if num_classes == 100 else 0.9)
    found = R.order_check(probs, labels, "eval.reference=f.csv", "test")
    assert found["acc"] > 0.75 and found["p_value"] < 1e-100
    for seed in range(3):
        shuffled = np.random.default_rng(seed).permutation(labels)
        with pytest.raises(UserError, match="misaligned with this run's test set") as err:
            R.order_check(probs, shuffled, "eval.reference=f.csv", "test")
        assert "another dataset or split" in str(err.value)


def test_the_order_check_refuses_a_small_set_that_beats_chance_by_luck():
    """4 of 10 right at chance 0.1 clears 3 x chance but not the binomial test."""
    labels = np.arange(10)
    probs = np.full((10, 10), 0.02, np.float32)
    pred = np.array([0, 1, 2, 3, 5, 6, 7, 8, 9, 4])  # 4 right, every class predicted once
    probs[np.arange(10), pred] = 0.82
    with pytest.raises(UserError, match="binomial p < 0.001; here p = 0.013"):
        R.order_check(probs, labels, "eval.reference=f.csv", "test")


def test_the_keys_a_file_needs_and_the_keys_a_folder_refuses(tmp_path):
    with pytest.raises(UserError, match="give eval.reference_dataset and eval.reference_split"):
        EvalSettings(reference="probs.csv")
    with pytest.raises(UserError, match="give eval.reference_split"):
        EvalSettings(reference="probs.npy", reference_dataset="cifar10")
    with pytest.raises(UserError, match="eval.reference_split: only a reference file"):
        EvalSettings(reference=str(tmp_path), reference_split="test")
    with pytest.raises(UserError, match="eval.reference is not set"):
        EvalSettings(reference_dataset="cifar10")
    ok = EvalSettings(reference="p.csv.gz", reference_dataset="cifar10", reference_split="test")
    assert ok.reference_split == "test"
    # the presets name the vendored file through a resolver; an unknown name says what is there
    cfg = compose_cfg("eval.reference=${bnn_bench.reference:cifar10_hmc_test.npz}")
    assert cfg.eval.reference == R.vendored("cifar10_hmc_test.npz")
    with pytest.raises(UserError, match="known: cifar10_hmc_test.npz"):
        R.vendored("nope.npz")


def test_a_file_of_another_dataset_set_or_size_is_refused_before_the_data(hmc):
    sizes = {"test": 10_000, "val": 5_000, "ood": 26_032}
    args = ("eval.reference=f", "cifar10", "test", "cifar10", 10, sizes)
    R.check(hmc, *args)  # the file's own setting passes
    with pytest.raises(UserError, match="belongs to dataset 'cifar10'.*dataset is 'cifar100'"):
        R.check(hmc, *args[:3], "cifar100", 100, sizes)
    with pytest.raises(UserError, match="reference_split=ood: this run has no such labelled"):
        R.check(hmc, args[0], "cifar10", "ood", *args[3:])
    with pytest.raises(UserError, match="10000 inputs of 10 classes, but this run's test set has"):
        R.check(hmc, *args[:5], {"test": 9_000})


# --- through a run (tiny synthetic data)


def _test_labels():
    return np.asarray(build(compose_cfg(*TINY).dataset, "dataset").load().test.y)


@pytest.mark.e2e
def test_a_run_scores_against_an_aligned_file_and_refuses_a_shuffled_one_before_fit(
    tmp_path, monkeypatch
):
    labels = _test_labels()
    aligned, shuffled = tmp_path / "aligned.csv", tmp_path / "shuffled.npy"
    np.savetxt(aligned, _peaked(labels))
    np.save(shuffled, _peaked(np.random.default_rng(0).permutation(labels)))
    keys = ["eval.reference_dataset=synthetic", "eval.reference_split=test"]

    # the dry run's (and the run's) checks before the data read the file; the order waits
    # for the labels
    def check(*overrides):
        return dry_run.check(Parts.of(compose_cfg(*TINY, *overrides)))

    assert check(f"eval.reference={aligned}", *keys).sets["test"] == 256
    with pytest.raises(UserError, match="holds 256 inputs of 10 classes, but this run's test set"):
        check(f"eval.reference={aligned}", *keys, "dataset.test_size=128")
    with pytest.raises(UserError, match="belongs to dataset 'mnist'"):
        check(f"eval.reference={aligned}", "eval.reference_dataset=mnist", keys[1])
    check(f"eval.reference={shuffled}", *keys)  # the same size: only the labels tell

    fast = ["trainer.steps=2", "eval.plots=false"]
    metrics = run(compose_cfg(*TINY, f"eval.reference={aligned}", *keys, *fast), tmp_path / "ok")
    mine = np.load(tmp_path / "ok" / "predictive" / "test.npy")
    ref = np.loadtxt(aligned).astype(np.float32)
    assert metrics["test/agreement"] == pytest.approx(float(agreement(mine, ref)), abs=1e-12)
    assert metrics["test/total_variation"] == pytest.approx(
        float(total_variation_distance(mine, ref)), rel=1e-5
    )
    assert "val/agreement" not in metrics  # the file covers the test set only

    from bnn_bench.methods.point.map import MAP

    def no_fit(*args, **kwargs):
        raise AssertionError("fit ran before the reference's order was checked")

    monkeypatch.setattr(MAP, "fit", no_fit)
    with pytest.raises(UserError, match="misaligned with this run's test set"):
        run(compose_cfg(*TINY, f"eval.reference={shuffled}", *keys, *fast), tmp_path / "bad")
    assert not (tmp_path / "bad" / "metrics.json").exists()
