"""The trainer: optimisers and schedules as optax defines them; the scan loop learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.data.synthetic import load
from bnn_bench.errors import UserError
from bnn_bench.methods.training import Trainer, epoch_batches
from bnn_bench.models import build_model
from bnn_bench.models.mlp import MLP


def test_schedules():
    t = Trainer(schedule="multistep", milestones=[2, 3], gamma=0.1, learning_rate=0.5)
    lr = t.learning_rate_fn(num_steps=40, steps_per_epoch=10)
    assert [float(lr(s)) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx(
        [0.5, 0.5, 0.05, 0.05, 0.005, 0.005]
    )
    cos = Trainer(schedule="cosine", learning_rate=1.0).learning_rate_fn(100, 10)
    assert float(cos(0)) == pytest.approx(1.0) and float(cos(50)) == pytest.approx(0.5)
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-7)


def test_sgd_with_weight_decay_is_coupled_l2():
    """PyTorch's SGD(weight_decay=wd): g <- g + wd * p, then momentum."""
    t = Trainer(optimizer="sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.5)
    tx = t.make_optimizer(10, 10)
    p = {"w": jnp.array([2.0])}
    updates, _ = tx.update({"w": jnp.array([1.0])}, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], [-0.1 * (1.0 + 0.5 * 2.0)])


def test_epoch_batches_cover_each_example_once():
    idx = np.asarray(epoch_batches(jax.random.key(3), 103, 10))
    assert idx.shape == (10, 10) and len(set(idx.ravel())) == 100


def test_training_learns_and_is_deterministic():
    data = load(train_size=512, test_size=256, contrast=0.5)
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
    with pytest.raises(UserError, match="trainer.schedule must be one of"):
        Trainer(schedule="linear")


def test_divergence_stops_with_a_clear_error():
    data = load(train_size=256, test_size=64)
    model = build_model(MLP(10, hidden=(16,)), data.spec, "mlp")
    with pytest.raises(UserError, match="diverged"):
        Trainer(learning_rate=1e30, epochs=2, batch_size=64).train(jax.random.key(0), model, data)
