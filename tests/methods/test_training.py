"""The trainer: optimisers and schedules are optax nodes; the scan loop learns."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf

from bnn_bench.config import build, validate
from bnn_bench.data import SyntheticDataset
from bnn_bench.errors import UserError
from bnn_bench.methods.training import Trainer, epoch_batches
from bnn_bench.models import build_model
from bnn_bench.models.mlp import MLP
from tests.conftest import compose_cfg

pytestmark = pytest.mark.unit


def _trainer(*overrides: str) -> Trainer:
    cfg = compose_cfg("method=map", *overrides)
    validate(cfg)
    return build(cfg.trainer, "trainer")


def _updates(tx: optax.GradientTransformation, steps: int = 5) -> list[np.ndarray]:
    """The updates of ``steps`` steps on fixed gradients, as arrays."""
    params = {"w": jnp.array([0.5, -1.0, 2.0])}
    state, out = tx.init(params), []
    for i in range(steps):
        grads = {"w": jnp.array([1.0, -0.5, 0.25]) * (i + 1)}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(updates["w"]))
    return out


def test_default_trainer_is_adam_with_cosine_decay_over_the_run():
    """Bit for bit the optimiser the string switches built (adam 3e-3, cosine to 0)."""
    got = _updates(_trainer().make_optimizer(num_steps=10))
    ref = _updates(optax.adam(optax.cosine_decay_schedule(3e-3, 10), 0.9, 0.999))
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g, r)


def test_schedules_from_their_groups():
    cos = _trainer("trainer.schedule.init_value=1.0").learning_rate_fn(100)
    assert float(cos(0)) == pytest.approx(1.0) and float(cos(50)) == pytest.approx(0.5)
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-7)
    const = _trainer("trainer/schedule=constant", "trainer.schedule.value=0.2")
    assert float(const.learning_rate_fn(100)(77)) == pytest.approx(0.2)
    steps = _trainer(
        "trainer/schedule=piecewise",
        "trainer.schedule.init_value=0.5",
        "trainer.schedule.boundaries_and_scales={20:0.1,30:0.1}",
    ).learning_rate_fn(40)
    assert [float(steps(s)) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx(
        [0.5, 0.5, 0.05, 0.05, 0.005, 0.005]
    )
    # a number is a constant rate: optax takes it as the learning rate itself
    assert _trainer("trainer.schedule=0.01").learning_rate_fn(100) == 0.01


def test_sgd_with_l2_is_pytorchs_coupled_weight_decay():
    """PyTorch's SGD(weight_decay=wd): g <- g + wd * p, then the step."""
    t = _trainer(
        "trainer/optimizer=sgd",
        "trainer.optimizer.momentum=null",
        "trainer/schedule=constant",
        "trainer.schedule.value=0.1",
        "trainer.l2=0.5",
    )
    tx = t.make_optimizer(10)
    p = {"w": jnp.array([2.0])}
    updates, _ = tx.update({"w": jnp.array([1.0])}, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], [-0.1 * (1.0 + 0.5 * 2.0)])


def test_adamw_decays_decoupled():
    """optax.adamw's weight_decay: the step is lr * (adam direction + wd * p)."""
    t = _trainer(
        "trainer/optimizer=adamw",
        "trainer.optimizer.weight_decay=0.5",
        "trainer/schedule=constant",
        "trainer.schedule.value=0.1",
    )
    tx = t.make_optimizer(10)
    p = {"w": jnp.array([2.0])}
    updates, _ = tx.update({"w": jnp.array([3.0])}, tx.init(p), p)
    # first Adam step: m̂ / (√v̂ + eps) = g / |g| = 1
    np.testing.assert_allclose(updates["w"], [-0.1 * (1.0 + 0.5 * 2.0)], rtol=1e-5)


def test_a_misspelt_optimizer_key_names_the_accepted_ones():
    cfg = compose_cfg("method=map", "trainer/optimizer=sgd")
    OmegaConf.set_struct(cfg, False)  # as a YAML typo arrives: composed, not struct-checked
    cfg.trainer.optimizer.momentun = 0.5
    with pytest.raises(UserError) as e:
        validate(cfg)
    assert "trainer.optimizer.momentun" in str(e.value)
    assert "Did you mean 'momentum'" in str(e.value) and "nesterov" in str(e.value)


def test_a_partial_schedule_without_decay_steps_is_refused():
    t = _trainer("trainer/schedule=constant", "+trainer.schedule._partial_=true")
    with pytest.raises(UserError, match="drop _partial_"):
        t.make_optimizer(10)


def test_epoch_batches_cover_each_example_once():
    idx = np.asarray(epoch_batches(jax.random.key(3), 103, 10))
    assert idx.shape == (10, 10) and len(set(idx.ravel())) == 100


def test_training_learns_and_is_deterministic():
    data = SyntheticDataset(train_size=512, test_size=256, contrast=0.5).load()
    model = build_model(MLP(10, hidden=(32,)), data.spec, "mlp")
    t = Trainer(epochs=4, batch_size=64, chunk_size=3)  # chunks that straddle nothing
    a = t.train(jax.random.key(0), model, data)
    b = t.train(jax.random.key(0), model, data)
    chex_equal = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a.params, b.params)
    assert all(jax.tree.leaves(chex_equal))
    acc = float((model.probs(a.params, a.state, data.test.x).argmax(-1) == data.test.y).mean())
    assert acc > 0.6


def test_steps_override_epochs_and_bad_values_fail_clearly():
    assert Trainer(steps=7, epochs=100).num_steps(1000) == 7
    with pytest.raises(UserError, match="larger than the training split"):
        Trainer(batch_size=64).num_steps(10)
    with pytest.raises(UserError, match="trainer.schedule"):
        Trainer(schedule="linear")
    # ranges are annotations (schema.Positive), checked with the config before any work
    for override, message in [
        ("trainer.schedule=-1.0", "trainer.schedule must be > 0, got -1.0"),
        ("trainer.batch_size=0", "trainer.batch_size must be > 0, got 0"),
        ("trainer.l2=-0.1", "trainer.l2 must be >= 0, got -0.1"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            validate(compose_cfg("method=map", override))


def test_divergence_stops_with_a_clear_error():
    data = SyntheticDataset(train_size=256, test_size=64).load()
    model = build_model(MLP(10, hidden=(16,)), data.spec, "mlp")
    with pytest.raises(UserError, match="diverged.*trainer.schedule"):
        Trainer(schedule=1e30, epochs=2, batch_size=64).train(jax.random.key(0), model, data)
