"""Corruptions of uint8 images: exact cases and invariants."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bnn_bench.errors import UserError
from bnn_bench.evaluation.settings import EvalSettings
from bnn_bench.evaluation.shift import CORRUPTIONS, corrupt

pytestmark = pytest.mark.unit


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 6, 6, 2)).astype(np.uint8)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_by_right_angles_is_exact_and_counter_clockwise(images, k):
    out = np.asarray(corrupt(jax.random.key(0), images, "rotate", 90.0 * k))
    np.testing.assert_array_equal(out, np.rot90(images, k, axes=(1, 2)))


def test_rotation_keeps_shape_and_fills_black():
    x = np.full((1, 8, 5, 1), 200, np.uint8)  # not square: corners leave the image
    out = np.asarray(corrupt(jax.random.key(0), x, "rotate", 45.0))
    assert out.shape == x.shape and out.dtype == np.uint8
    assert out[0, 0, -1, 0] == 0 and out[0, -1, 0, 0] == 0 and out[0, 4, 2, 0] == 200


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_level_zero_is_identity_and_shapes_are_kept(images, name):
    np.testing.assert_array_equal(np.asarray(corrupt(jax.random.key(0), images, name, 0.0)), images)
    out = corrupt(jax.random.key(0), images, name, 0.5)
    assert out.shape == images.shape and out.dtype == np.uint8


def test_contrast_invert_and_noise(images):
    key = jax.random.key(3)
    flat = np.asarray(corrupt(key, images, "contrast", 1.0))
    assert (flat.reshape(3, -1).std(-1) == 0).all()  # every image one grey
    np.testing.assert_array_equal(np.asarray(corrupt(key, images, "invert", 1.0)), 255 - images)
    a = np.asarray(corrupt(key, images, "gaussian_noise", 0.2))
    b = np.asarray(corrupt(key, images, "gaussian_noise", 0.2))
    np.testing.assert_array_equal(a, b)  # same key, same noise
    diff = a.astype(float) - images
    inner = (images > 80) & (images < 175)  # away from clipping
    assert 0.15 * 255 < diff[inner].std() < 0.25 * 255
    # batched corruption gives each batch its own noise
    c = np.asarray(corrupt(key, np.repeat(images[:1], 4, 0), "gaussian_noise", 0.2, batch_size=2))
    assert not np.array_equal(c[0], c[2])


def test_settings_reject_bad_shift_and_ood():
    with pytest.raises(UserError, match="unknown corruption 'blur'"):
        EvalSettings(shift=["blur"])
    with pytest.raises(UserError, match="shift_levels.rotate"):
        EvalSettings(shift=["rotate"], shift_levels={"rotate": []})
    with pytest.raises(UserError, match=r"dataset@eval.ood_dataset=NAME"):
        EvalSettings(ood_dataset="mnist")
    s = EvalSettings(shift=["invert", "rotate"], shift_levels={"rotate": [90]})
    assert s.shift_sets() == [
        ("invert", 0.25),
        ("invert", 0.5),
        ("invert", 0.75),
        ("invert", 1.0),
        ("rotate", 90.0),
    ]


def test_rotation_matches_scipy_at_any_angle():
    from scipy import ndimage

    x = np.zeros((2, 28, 28, 1), np.uint8)
    x[:, 6:22, 10:18] = 220  # an upright bar
    x[1, 4:8, 4:24] = 120
    for angle in (15.0, 37.0, 150.0):
        ours = np.asarray(corrupt(jax.random.key(0), x, "rotate", angle)).astype(float)
        # scipy: a positive angle turns the (row, column) image counter-clockwise on screen
        ref = ndimage.rotate(
            x.astype(float), angle, axes=(2, 1), reshape=False, order=1, mode="constant", cval=0.0
        )
        assert np.abs(ours - ref).mean() < 1.0 and np.abs(ours - ref).max() < 40


def test_cifar10_c_names_levels_and_a_clear_error_offline(tmp_path):
    from bnn_bench.data import SyntheticDataset
    from bnn_bench.evaluation.sets import evaluation_sets

    s = EvalSettings(shift=["cifar10c_fog"], tfds_data_dir=str(tmp_path))
    assert s.shift_sets() == [("cifar10c_fog", float(v)) for v in (1, 2, 3, 4, 5)]
    with pytest.raises(UserError, match="not in CIFAR-10-C|unknown corruption"):
        EvalSettings(shift=["cifar10c_haze"])
    cifar_like = SyntheticDataset(shape=(32, 32, 3), train_size=16, test_size=16).load()
    with pytest.raises(UserError, match=r"cifar10_corrupted/fog_1 is not in the TFDS data dir"):
        evaluation_sets(cifar_like, s)
    with pytest.raises(UserError, match="Use it with dataset=cifar10"):
        evaluation_sets(SyntheticDataset(train_size=16, test_size=16).load(), s)
