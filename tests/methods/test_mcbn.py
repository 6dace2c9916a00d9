"""MC-BatchNorm: whole-set minibatches give the population statistics; small ones differ."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.errors import UserError
from bnn_bench.models import build_model
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg

SMALL = [
    *(o for o in TINY if not o.startswith("model")),
    "model=lenet",
    "model.norm=batchnorm",
    "dataset.train_size=256",
    "dataset.test_size=64",
    "trainer.epochs=2",
    "method=mcbn",
    "method.num_estimators=3",
]


@pytest.fixture(scope="module")
def fitted():
    """A LeNet-BN trained once; MC statistics from minibatches of the whole training split."""
    cfg = compose_cfg(*SMALL)
    data = build(cfg.dataset, "dataset")
    model = build_model(build(cfg.model, "model", num_classes=10), data.spec, "lenet", 128)
    method = dataclasses.replace(build(cfg.method, "method"), mc_batch_size=data.train.size)
    post = method.fit(jax.random.key(0), model, data)
    return data, model, method, post


def _population_stats(params, spec, x):
    """Direct computation: LeNet's two BatchNorm inputs over all of x, layer by layer,
    each normalised by its exact mean and (biased) variance before the next."""
    h = spec.preprocess(x)
    stats = {}
    for i, width in enumerate((6, 16)):
        h = nn.Conv(width, (5, 5), padding="VALID").apply({"params": params[f"Conv_{i}"]}, h)
        mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
        stats[f"BatchNorm_{i}"] = {"mean": mean, "var": var}
        bn = params[f"BatchNorm_{i}"]
        h = (h - mean) / jnp.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
        h = nn.max_pool(nn.relu(h), (2, 2), (2, 2))
    return stats


def test_whole_training_set_gives_population_statistics(fitted):
    data, model, method, post = fitted
    pop = _population_stats(post.params, data.spec, data.train.x)
    for s in range(post.num_estimators):
        got = jax.tree.map(lambda a, s=s: a[s], post.mc_stats)
        jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-3, atol=1e-5), got, pop)
    probs = np.concatenate(list(method.members(jax.random.key(0), post, data.test.x)))
    ref = model.probs(post.params, {"batch_stats": pop}, data.test.x)
    assert probs.shape == (3, data.test.size, 10)
    np.testing.assert_allclose(probs, np.broadcast_to(ref, probs.shape), atol=1e-4)
    # the trained running (EMA) statistics are kept, and they are not the population's
    running = post.state["batch_stats"]["BatchNorm_0"]["var"]
    assert np.abs(np.asarray(running - pop["BatchNorm_0"]["var"])).max() > 1e-3
    extra = method.report(jax.random.key(0), post, {"test": data.test}, 15)
    map_probs = model.probs(post.params, post.state, data.test.x)
    np.testing.assert_allclose(
        extra["map/test/acc"], float((map_probs.argmax(-1) == data.test.y).mean())
    )


def test_small_minibatches_give_different_members(fitted):
    data, model, method, post = fitted
    small = dataclasses.replace(method, mc_batch_size=8)
    post8 = small.fit_statistics(jax.random.key(1), model, post.params, post.state, data.train)
    probs = np.concatenate(list(small.members(jax.random.key(0), post8, data.test.x)))
    assert probs.shape[0] == 3
    assert np.abs(probs[0] - probs[1]).max() > 1e-3 and np.abs(probs[1] - probs[2]).max() > 1e-3
    # fitted once: the same members for any inputs (a subset gives the subset's rows)
    part = np.concatenate(list(small.members(jax.random.key(5), post8, data.test.x[:7])))
    np.testing.assert_allclose(part, probs[:, :7], atol=1e-6)


def test_model_without_batch_norm_is_a_clear_error(tmp_path):
    cfg = compose_cfg(*[o for o in SMALL if not o.startswith("model")], "model=mlp")
    with pytest.raises(UserError, match="needs a model with BatchNorm.*model.norm=batchnorm"):
        run(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists()
