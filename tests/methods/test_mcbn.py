"""MC-BatchNorm: whole-set minibatches give the population statistics; small ones differ."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.data import Spec, Split
from bnn_bench.errors import UserError
from bnn_bench.methods.posthoc.mcbn import MCBN
from bnn_bench.models import build_model
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg

pytestmark = pytest.mark.e2e

SMALL = [
    *(o for o in TINY if not o.startswith("model")),
    "model=lenet",
    "model.norm=batchnorm",
    "dataset.train_size=256",
    "dataset.test_size=64",
    "trainer.epochs=2",
    "method=mcbn",
    "method.members=3",
]


@pytest.fixture(scope="module")
def fitted():
    """A LeNet-BN trained once; MC statistics from minibatches of the whole training split."""
    cfg = compose_cfg(*SMALL)
    data = build(cfg.dataset, "dataset").load()
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
    for s in range(post.members):
        got = jax.tree.map(lambda a, s=s: a[s], post.mc_stats)
        jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-3, atol=1e-5), got, pop)
    probs = np.exp(
        np.concatenate(list(method.member_log_probs(jax.random.key(0), post, data.test.x)))
    )
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
    probs = np.exp(
        np.concatenate(list(small.member_log_probs(jax.random.key(0), post8, data.test.x)))
    )
    assert probs.shape[0] == 3
    assert np.abs(probs[0] - probs[1]).max() > 1e-3 and np.abs(probs[1] - probs[2]).max() > 1e-3
    # fitted once: the same members for any inputs (a subset gives the subset's rows)
    part = np.exp(
        np.concatenate(list(small.member_log_probs(jax.random.key(5), post8, data.test.x[:7])))
    )
    np.testing.assert_allclose(part, probs[:, :7], atol=1e-6)


class _DenseBN(nn.Module):
    """Dense -> BatchNorm -> Dense: the BatchNorm sees one row per input, so a batch of
    4 makes the biased and the unbiased variance differ by 4/3."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(3)(x.reshape(x.shape[0], -1))
        h = nn.BatchNorm(use_running_average=not train)(h)
        return nn.Dense(2)(h)


@pytest.mark.parametrize("unbiased", [False, True])
def test_statistics_use_the_biased_variance_unless_told(unbiased):
    # Training-mode BatchNorm (and Teye et al.'s MCBN) normalises with the biased batch
    # variance; TorchUncertainty's MCBatchNorm stores x.var(unbiased=True).
    spec = Spec("tiny", (2, 2, 1), 2, ("a", "b"), (0.0,), (1.0,))
    model = build_model(_DenseBN(), spec, "dense_bn")
    params, state = model.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (4, 2, 2, 1), 0, 256).astype(jnp.uint8)
    train = Split(x, jnp.zeros(4, jnp.int32))
    method = MCBN(trainer=None, members=2, mc_batch_size=4, unbiased_variance=unbiased)
    post = method.fit_statistics(jax.random.key(2), model, params, state, train)
    h = np.asarray(
        nn.Dense(3).apply({"params": params["Dense_0"]}, spec.preprocess(x).reshape(4, -1))
    )
    mean, var = h.mean(0), h.var(0, ddof=1 if unbiased else 0)
    for s in range(2):  # each minibatch is the whole split, in some order
        np.testing.assert_allclose(post.mc_stats["BatchNorm_0"]["mean"][s], mean, rtol=1e-5)
        np.testing.assert_allclose(post.mc_stats["BatchNorm_0"]["var"][s], var, rtol=1e-5)
    probs = np.exp(np.concatenate(list(method.member_log_probs(jax.random.key(0), post, x))))
    ref = model.probs(params, {"batch_stats": {"BatchNorm_0": {"mean": mean, "var": var}}}, x)
    np.testing.assert_allclose(probs, np.broadcast_to(ref, probs.shape), atol=1e-5)


def test_model_without_batch_norm_is_a_clear_error(tmp_path):
    cfg = compose_cfg(*[o for o in SMALL if not o.startswith("model")], "model=mlp")
    with pytest.raises(UserError, match="needs a model with batch norm.*model.norm=batchnorm"):
        run(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_default_is_biased_and_the_torchuncertainty_preset_uses_its_unbiased_convention():
    assert build(compose_cfg(*SMALL).method, "method").unbiased_variance is False
    assert compose_cfg("experiment=tu_mnist_mcbn").method.unbiased_variance is True


def test_init_from_a_map_run_gives_the_members_of_training(tmp_path):
    """``init_from`` a `map` run of the same LeNet-BN and seed: the members are those of an
    `mcbn` run that trains its own MAP (the same network, the same minibatch keys); the
    trainer is ignored (1 epoch here would give another network), and nothing is trained."""
    as_map = [o for o in SMALL if not o.startswith("method")]
    mapped = run(compose_cfg(*as_map, "method=map"), tmp_path / "map")
    trained = run(compose_cfg(*SMALL), tmp_path / "trained")
    loaded = run(
        compose_cfg(*SMALL, f"method.init_from={tmp_path / 'map'}", "trainer.epochs=1"),
        tmp_path / "loaded",
    )
    assert loaded["map/test/acc"] == mapped["test/acc"]
    assert loaded["map/test/nll"] == pytest.approx(mapped["test/nll"], rel=1e-6)
    for name in ("test/acc", "test/nll", "test/ece"):
        assert loaded[name] == pytest.approx(trained[name], rel=1e-6), name
    assert trained["cost/grad_evals"] > 0 and loaded.get("cost/grad_evals", 0) == 0
    assert loaded["test/nll"] != pytest.approx(loaded["map/test/nll"], rel=1e-4)  # MC != MAP
