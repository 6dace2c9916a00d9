"""``dataset.augment``: a random crop after zero padding and a horizontal flip of each
training minibatch (``data.augment``), drawn where the trainer's scan and the SG-MCMC
step draw their minibatches, and nowhere else."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.data import Split
from bnn_bench.data.augment import AUGMENT_SALT, crop_flip, training_batch
from bnn_bench.errors import UserError
from bnn_bench.methods.training import scan_steps
from bnn_bench.models import build_model
from tests.conftest import compose_cfg, tiny

pytestmark = pytest.mark.unit


def candidates(image: np.ndarray, pad: int) -> list[np.ndarray]:
    """Every crop-and-flip of one (H, W, C) image, in closed form: the zero-padded image
    ``P``, its windows ``P[i : i + H, j : j + W]`` for i, j in 0..2·pad, each as it is
    and mirrored left-right."""
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    out = []
    for i, j in itertools.product(range(2 * pad + 1), repeat=2):
        window = padded[i : i + h, j : j + w]
        out += [window, window[:, ::-1]]
    return out


def test_each_image_is_one_crop_and_flip_of_its_padded_self_and_all_occur():
    # distinct pixel values (1..48): every one of the 2 (2·pad + 1)² outcomes differs
    image = (np.arange(4 * 4 * 3) + 1).reshape(4, 4, 3).astype(np.uint8)
    pad = 2
    cands = candidates(image, pad)
    assert len({c.tobytes() for c in cands}) == len(cands) == 50
    batch = jnp.asarray(np.repeat(image[None], 2000, axis=0))
    out = np.asarray(crop_flip(jax.random.key(0), batch, pad))
    assert out.shape == batch.shape and out.dtype == np.uint8
    seen = np.zeros(len(cands), int)
    for img in out:
        matches = [k for k, c in enumerate(cands) if np.array_equal(img, c)]
        assert len(matches) == 1  # exactly one crop-and-flip of the input
        seen[matches[0]] += 1
    # uniform over the 50 outcomes: 40 expected each; a 4-sigma band of a binomial
    assert seen.min() > 40 - 4 * np.sqrt(40) and seen.max() < 40 + 4 * np.sqrt(40)
    assert abs(seen[1::2].sum() / 2000 - 0.5) < 0.05  # flipped half of the time


def test_default_padding_is_4_and_images_of_every_shape_pass():
    image = np.arange(32 * 32).reshape(32, 32, 1).astype(np.uint8)
    out = np.asarray(crop_flip(jax.random.key(3), jnp.asarray(image[None])))[0]
    assert any(np.array_equal(out, c) for c in candidates(image, 4))


def test_the_augmentation_is_fixed_by_its_key_and_differs_across_keys():
    x = jax.random.randint(jax.random.key(9), (16, 8, 8, 3), 0, 256).astype(jnp.uint8)
    a = np.asarray(crop_flip(jax.random.key(1), x))
    np.testing.assert_array_equal(a, np.asarray(crop_flip(jax.random.key(1), x)))
    assert not np.array_equal(a, np.asarray(crop_flip(jax.random.key(2), x)))


def test_a_batch_is_augmented_only_when_asked_with_its_step_key_folded_by_name():
    x = jax.random.randint(jax.random.key(9), (10, 8, 8, 3), 0, 256).astype(jnp.uint8)
    split, idx, key = Split(x, jnp.arange(10)), jnp.asarray([3, 1, 4]), jax.random.key(5)
    xb, yb = training_batch(split, idx, key, augment=False)
    np.testing.assert_array_equal(xb, x[idx])
    xa, ya = training_batch(split, idx, key, augment=True)
    np.testing.assert_array_equal(xa, crop_flip(jax.random.fold_in(key, AUGMENT_SALT), x[idx]))
    np.testing.assert_array_equal(ya, yb)
    with pytest.raises(UserError, match="crops and flips images .* Set dataset.augment=false"):
        crop_flip(key, jnp.zeros((4, 7)))


@pytest.mark.parametrize("members", [False, True])
def test_the_trainer_scan_steps_on_augmented_batches(members):
    """The one place the trainer, ensembles, vote, VI and SWAG's SGD draw minibatches: a
    step that keeps the batch it was given shows what it saw."""
    x = jax.random.randint(jax.random.key(9), (12, 8, 8, 3), 0, 256).astype(jnp.uint8)
    split = Split(x, jnp.arange(12))
    k = 2 if members else 1
    idx = jnp.arange(3 * k * 4).reshape(3, k, 4) % 12  # 3 steps of batch 4 per member
    keys = jax.random.split(jax.random.key(0), 3 * k).reshape(3, k)
    if not members:
        idx, keys = idx[:, 0], keys[:, 0]

    def step(ts, xb, yb, key):  # the state becomes the batch
        del ts, yb, key
        return xb.astype(jnp.float32), (jnp.float32(0), jnp.float32(0))

    def last_step(draw):  # what the last step of each member draws
        if not members:
            return draw(idx[-1], keys[-1])
        return np.stack([draw(idx[-1, m], keys[-1, m]) for m in range(k)])

    ts = jnp.zeros((k, 4, 8, 8, 3) if members else (4, 8, 8, 3))
    for augment in (False, True):
        seen, _ = scan_steps(step, members, augment=augment)(ts, split, idx, keys)
        want = last_step(
            functools.partial(lambda a, i, kk: training_batch(split, i, kk, a)[0], augment)
        )
        np.testing.assert_array_equal(np.asarray(seen), np.asarray(want, np.float32))
    assert not np.array_equal(want, last_step(lambda i, kk: x[i]))  # augmented, not stored


def _model(method, *overrides):
    cfg = compose_cfg(*tiny(method), "dataset.shape=[8,8,3]", "model.hidden=[8]", *overrides)
    data = build(cfg.dataset, "dataset").load()
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    return cfg, data, build_model(module, data.spec, "mlp", 64)


def test_the_sgmcmc_step_draws_augmented_batches(monkeypatch):
    from bnn_bench.methods.sampling import sgmcmc

    cfg, data, model = _model("sgld", "dataset.augment=true", "method.batch_size=64")
    assert data.spec.augment
    asked = []

    def spy(split, idx, key, augment):
        asked.append(augment)
        return training_batch(split, idx, key, augment)

    monkeypatch.setattr(sgmcmc, "training_batch", spy)
    method = build(cfg.method, "method")
    budget = method.budget(data.train.size)
    params = jax.vmap(model.init)(jax.random.split(jax.random.key(0), method.num_chains))[0]
    states = method.init_states(model, data.train, params)
    step = method.transition(model, data.train, budget)
    jax.eval_shape(step, jax.random.key(1), states, 0)
    assert asked == [True]


def test_evaluation_sees_the_stored_images():
    """Augmentation lives in the minibatch draw alone: the model's forward pass (the
    predictive, MC-BatchNorm's and Laplace's passes) is the same with augment on or off."""
    _, data, model = _model("sgld", "dataset.augment=true")
    plain = dataclasses.replace(model, spec=dataclasses.replace(model.spec, augment=False))
    params, state = model.init(jax.random.key(0))
    x = data.test.x[:16]
    np.testing.assert_array_equal(model.probs(params, state, x), plain.probs(params, state, x))
    for train in (False, True):
        a = model.apply(params, state, x, train=train, key=jax.random.key(1))[0]
        b = plain.apply(params, state, x, train=train, key=jax.random.key(1))[0]
        np.testing.assert_array_equal(a, b)


def test_full_batch_hmc_refuses_augmentation():
    from bnn_bench.data.resolve import resolve

    cfg, _, model = _model("hmc", "dataset.augment=true")
    method = build(cfg.method, "method")
    data = resolve(build(cfg.dataset, "dataset"))
    with pytest.raises(UserError, match="method=hmc uses the whole training split as stored"):
        method.check(model, data)


@pytest.mark.e2e  # two tiny runs and a dry run
def test_a_run_records_augmentation_and_the_dry_run_names_a_reference_without_it(tmp_path, capsys):
    """metrics.json's ``data/augment`` and the fingerprint's ``augment``; the run's test
    predictive is the trained network's on the stored test images; a run scored against a
    reference of the other setting is told so, by the dry run and by the run."""
    from bnn_bench.methods.point.map import load_point
    from bnn_bench.run import run

    small = ["dataset.train_size=128", "dataset.test_size=32", "trainer.epochs=1"]
    cfg, data, model = _model("map", "dataset.augment=true", *small)
    metrics = run(cfg, tmp_path / "aug")
    assert metrics["data/augment"] == 1.0
    prints = json.loads((tmp_path / "aug" / "predictive" / "fingerprints.json").read_text())
    assert prints["augment"] is True
    params, state = load_point(tmp_path / "aug", model)
    np.testing.assert_allclose(
        np.load(tmp_path / "aug" / "predictive" / "test.npy"),
        model.probs(params, state, data.test.x),
        rtol=1e-5,
        atol=1e-6,
    )
    base = [*tiny("map"), "dataset.shape=[8,8,3]", "model.hidden=[8]", *small]
    ref = f"eval.reference={tmp_path / 'aug'}"
    capsys.readouterr()
    run(compose_cfg(*base, ref, "dry_run=true"), tmp_path / "dry")
    out = capsys.readouterr().out
    assert "reference  note: this run trains without augmentation (dataset.augment=false)" in out
    assert "was made with it" in out
    run(compose_cfg(*base, "dataset.augment=true", ref, "dry_run=true"), tmp_path / "dry")
    assert "reference  note" not in capsys.readouterr().out
    plain = run(compose_cfg(*base, ref), tmp_path / "plain")
    assert plain["data/augment"] == 0.0 and "test/agreement" in plain
