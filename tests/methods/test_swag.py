"""``swag``: the moments are the iterates' averages; draws have the stated covariance, the
low-rank term estimates the iterates' covariance; the SGD phase resumes where it stopped."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hydra.errors import HydraException
from jax.flatten_util import ravel_pytree

from bnn_bench.checkpoint import Preempted
from bnn_bench.config import build, validate
from bnn_bench.errors import UserError
from bnn_bench.methods.posthoc.swag import SGD_SALT
from bnn_bench.methods.posthoc.swag_covariance import (
    SWA,
    Diagonal,
    LowRank,
    low_rank_fraction,
    swag_collect,
    swag_covariance,
    swag_init,
    swag_sample,
)
from bnn_bench.methods.posthoc.swag_sgd import SGDPhase
from bnn_bench.methods.training import epoch_batches
from bnn_bench.models import build_model
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg, tiny

pytestmark = pytest.mark.e2e

# P = 6·6·3 + 3 + 3·3 + 3 = 123 parameters: dense covariances are cheap.
SMALL = [
    *TINY,
    "dataset.shape=[6,6,1]",
    "dataset.num_classes=3",
    "dataset.train_size=200",
    "dataset.test_size=32",
    "model.hidden=[3]",
    "trainer.epochs=10",
    "trainer.batch_size=16",
    "method=swag",
    "method.sgd.epochs=3",
    "method.sgd.batch_size=16",
    "method.sgd.learning_rate=0.05",
    "method.collect_every=4",
    "method.covariance.rank=4",  # 9 iterates collected: at least 2K
]


def _setup(*overrides, base=SMALL, name="mlp"):
    cfg = compose_cfg(*base, *overrides)
    data = build(cfg.dataset, "dataset").load()
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(module, data.spec, name, cfg.eval.batch_size)
    return data, model, build(cfg.method, "method")


def _collect(thetas, rank):
    state = swag_init(jnp.zeros(thetas.shape[1]), rank)
    for t in thetas:
        state = swag_collect(state, t)
    return state


def _formula(thetas, rank, scale, diag_only=False):
    """scale · (Σ_diag + D Dᵀ/(K − 1)) straight from the iterates, in float64."""
    t = np.asarray(thetas, np.float64)
    n = len(t)
    means = np.cumsum(t, 0) / np.arange(1, n + 1)[:, None]  # θ̄_i after iterate i
    cov = np.diag((t**2).mean(0) - t.mean(0) ** 2)
    if not diag_only:
        d = (t - means)[-rank:]  # the last K deviations, (K, P)
        cov = cov + d.T @ d / (len(d) - 1)
    return scale * cov


def test_moments_and_deviations_are_those_of_the_iterates():
    thetas = jax.random.normal(jax.random.key(0), (7, 5)) * jnp.arange(1.0, 6.0) + 2.0
    state = _collect(thetas, rank=4)
    t = np.asarray(thetas, np.float64)
    assert int(state.count) == 7
    np.testing.assert_allclose(state.mean, t.mean(0), rtol=1e-6)
    np.testing.assert_allclose(state.sq_mean, (t**2).mean(0), rtol=1e-6)
    means = np.cumsum(t, 0) / np.arange(1, 8)[:, None]
    for i in range(3, 7):  # the last four iterates, in ring-buffer slots i mod 4
        np.testing.assert_allclose(state.deviations[i % 4], t[i] - means[i], atol=1e-5)
    no_buffer = _collect(thetas, rank=0)  # diagonal and SWA keep no deviations
    np.testing.assert_array_equal(no_buffer.mean, state.mean)
    assert no_buffer.deviations.shape == (0, 5)


@pytest.mark.parametrize(("diag_only", "scale"), [(False, 0.5), (True, 1.0)])
def test_draws_have_the_swag_covariance(diag_only, scale):
    thetas = jax.random.normal(jax.random.key(1), (6, 4)) @ jnp.diag(jnp.array([1.0, 2, 0.5, 1]))
    state = _collect(thetas, rank=3)  # six iterates, three kept: the buffer has wrapped
    ref = _formula(thetas, 3, scale, diag_only)
    got = swag_covariance(state, scale, diag_only)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    n = 200_000
    draws = jax.vmap(lambda k: swag_sample(k, state, scale, diag_only))(
        jax.random.split(jax.random.key(2), n)
    )
    emp = np.cov(np.asarray(draws, np.float64), rowvar=False)
    se = np.sqrt((np.outer(np.diag(ref), np.diag(ref)) + ref**2) / n)  # Wishart std
    assert (np.abs(emp - ref) <= 5 * se + 1e-9).all()
    np.testing.assert_allclose(np.asarray(draws).mean(0), state.mean, atol=0.02)


@pytest.mark.parametrize("n", [40, 20])
def test_low_rank_term_estimates_the_covariance_of_the_iterates(n):
    """Iterates i.i.d. from N(μ, C), rank K = 20 (the default): over many replications the
    low-rank term D Dᵀ/(K − 1) averages to low_rank_fraction(n, K) times the sample
    covariance of the last K iterates (dense numpy, unbiased for C): ≈ 1.02 with n = 2K
    iterates, ≈ 0.86 with n = K (every iterate a column, the first one zero)."""
    k, reps = 20, 20_000
    a = np.array([[1.0, 0, 0], [0.8, 0.6, 0], [-0.5, 0.3, 1.2]])
    mu = jnp.array([1.0, -2.0, 0.5])

    def one(key):
        thetas = mu + jax.random.normal(key, (n, 3)) @ jnp.asarray(a.T, jnp.float32)
        state = jax.lax.fori_loop(
            0, n, lambda i, s: swag_collect(s, thetas[i]), swag_init(jnp.zeros(3), k)
        )
        low_rank = swag_covariance(state, 1.0) - swag_covariance(state, 1.0, diag_only=True)
        return thetas[-k:], low_rank

    last, low_rank = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(7), reps))
    last, low_rank = np.asarray(last, np.float64), np.asarray(low_rank, np.float64)
    centred = last - last.mean(1, keepdims=True)  # (reps, K, 3)
    sample_cov = np.einsum("rki,rkj->rij", centred, centred) / (k - 1)  # each unbiased for C
    np.testing.assert_allclose(sample_cov.mean(0), a @ a.T, atol=0.03)
    diff = low_rank - low_rank_fraction(n, k) * sample_cov  # paired: the same iterates
    assert (np.abs(diff.mean(0)) <= 5 * diff.std(0) / np.sqrt(reps)).all()
    ratio = np.trace(low_rank.mean(0)) / np.trace(sample_cov.mean(0))
    assert abs(ratio - 1) < 0.03 if n >= 2 * k else ratio < 0.88


@pytest.fixture(scope="module")
def fitted():
    data, model, method = _setup()
    key = jax.random.key(0)
    post = method.fit(key, model, data)
    return data, model, method, post, key


def _iterates(key, model, data, method, params) -> np.ndarray:
    """The SGD phase written out step by step from the keys the module documents: the
    flat parameters after every ``collect_every``-th step and after the last, (n, P)."""
    sgd, every = method.sgd, method.collect_every
    n = data.train.size
    per_epoch = n // sgd.batch_size
    total = sgd.epochs * per_epoch
    k_data, _ = jax.random.split(jax.random.fold_in(key, SGD_SALT))
    tx = optax.chain(optax.add_decayed_weights(sgd.l2), optax.sgd(sgd.learning_rate, momentum=0.9))

    @jax.jit
    def step(params, opt, idx):
        def loss(p):
            logits = model.apply(p, {}, data.train.x[idx], train=True)[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, data.train.y[idx]).mean()

        updates, opt = tx.update(jax.grad(loss)(params), opt, params)
        return optax.apply_updates(params, updates), opt

    opt, out = tx.init(params), []
    for t in range(total):
        epoch, i = divmod(t, per_epoch)
        idx = epoch_batches(jax.random.fold_in(k_data, epoch), n, sgd.batch_size)[i]
        params, opt = step(params, opt, idx)
        if (t + 1) % every == 0 or t + 1 == total:
            out.append(np.asarray(ravel_pytree(params)[0]))
    return np.stack(out)


def test_swa_mean_is_the_average_of_the_sgd_iterates(fitted):
    data, model, method, post, key = fitted
    iterates = _iterates(key, model, data, method, post.params)
    assert data.train.size == 180 and method.sgd.num_steps(180) == 33
    assert len(iterates) == -(-33 // 4) == int(post.swag.count) == method.collections(180)
    np.testing.assert_allclose(post.swag.mean, iterates.mean(0), atol=1e-5)
    np.testing.assert_allclose(
        post.swag.deviations[(len(iterates) - 1) % 4], iterates[-1] - iterates.mean(0), atol=1e-5
    )
    # the iterates moved away from the MAP start and from each other
    assert float(np.abs(iterates[0] - iterates[-1]).max()) > 1e-3
    info = dict(post.info)
    assert info.pop("time/map") >= 0  # every post-hoc method times its MAP step
    assert info == {"swag/collected": 9.0, "swag/rank": 4.0, "swag/sgd_steps": 33.0}


def test_members_parameters_have_the_swag_covariance(fitted):
    data, model, method, post, key = fitted
    assert method.covariance.scale == 0.5  # the default
    many = dataclasses.replace(method, covariance=LowRank(rank=4, members=20_000))
    thetas = np.asarray(many.sample_thetas(jax.random.key(5), post), np.float64)  # (S, P)
    ref = np.asarray(swag_covariance(post.swag, 0.5), np.float64)
    emp = np.cov(thetas, rowvar=False)
    se = np.sqrt((np.outer(np.diag(ref), np.diag(ref)) + ref**2) / len(thetas))
    assert (np.abs(emp - ref) <= 5.5 * se + 1e-9).all()
    # the low-rank part carries correlations the diagonal lacks
    off = ref - np.diag(np.diag(ref))
    assert np.abs(off).max() > 0.1 * np.diag(ref).max()


@pytest.mark.parametrize("covariance", [LowRank, Diagonal])
def test_scale_multiplies_the_members_covariance(fitted, covariance):
    """Same key: the members' offsets from θ̄ scale by √scale, so their covariance by scale
    (scale 0.5 halves the covariance of scale 1)."""
    _, _, method, post, _ = fitted
    kw = {"rank": 4} if covariance is LowRank else {}

    def offsets(scale):
        m = dataclasses.replace(method, covariance=covariance(members=8, scale=scale, **kw))
        return np.asarray(m.sample_thetas(jax.random.key(4), post) - post.swag.mean)

    one, half = offsets(1.0), offsets(0.5)
    assert np.abs(one).max() > 1e-3
    np.testing.assert_allclose(half, np.sqrt(0.5) * one, rtol=1e-5, atol=1e-7)
    diag_only = covariance is Diagonal
    np.testing.assert_allclose(
        swag_covariance(post.swag, 0.5, diag_only),
        0.5 * swag_covariance(post.swag, 1.0, diag_only),
        rtol=1e-6,
    )


def test_members_are_the_networks_of_the_draws_and_swa_is_the_mean(fitted):
    data, model, method, post, key = fitted
    x = data.test.x
    probs = np.exp(np.concatenate(list(method.member_log_probs(jax.random.key(3), post, x))))
    thetas = method.sample_thetas(jax.random.key(3), post)
    s = method.covariance.members
    assert probs.shape == (s, 32, 3)
    for i in (0, s - 1):
        ref = model.probs(post.unravel(thetas[i]), post.state, x)
        np.testing.assert_allclose(probs[i], ref, atol=1e-6)
    swa = dataclasses.replace(method, covariance=SWA())
    (mean_probs,) = np.exp(list(swa.member_log_probs(jax.random.key(3), post, x)))
    assert mean_probs.shape == (1, 32, 3)
    np.testing.assert_allclose(
        mean_probs[0], model.probs(post.unravel(post.swag.mean), post.state, x), atol=1e-6
    )


def test_batchnorm_statistics_are_refit_for_each_draw():
    """LeNet-BN, one refresh batch holding the whole training split: the first BatchNorm
    layer's statistics are its input's mean and variance over that split."""
    base = [o for o in TINY if not o.startswith("model")]
    data, model, method = _setup(
        "model=lenet",
        "model.norm=batchnorm",
        "dataset.train_size=142",  # 128 after the validation split: one batch
        "trainer.epochs=1",
        "trainer.batch_size=128",
        "method=swag",
        "method.sgd.epochs=2",
        "method.sgd.batch_size=128",
        "method/swag/covariance=swa",
        "method.bn_refresh_batches=1",
        base=base,
        name="lenet",
    )
    assert data.train.size == 128
    post = method.fit(jax.random.key(0), model, data)
    params, state = post.network(post.swag.mean)
    h = nn.Conv(6, (5, 5), padding="VALID").apply(
        {"params": params["Conv_0"]}, data.spec.preprocess(data.train.x)
    )
    got = state["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(got["mean"], h.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["var"], h.var((0, 1, 2), ddof=1), rtol=1e-3, atol=1e-5)
    running = post.state["batch_stats"]["BatchNorm_0"]["var"]  # the MAP's, kept apart
    assert np.abs(np.asarray(running - got["var"])).max() > 1e-3
    (probs,) = np.exp(list(method.member_log_probs(jax.random.key(1), post, data.test.x)))
    np.testing.assert_allclose(probs[0], model.probs(params, state, data.test.x), atol=1e-6)


def test_default_collection_is_twice_the_rank_evenly_over_the_phase():
    """collect_every null: every ⌊33 / 2K⌋ steps and after the last, so at least 2K iterates
    (and on the real split, 8,420 steps and K = 20: every 210 steps, 41 iterates);
    without deviations (diagonal, swa), once per epoch."""
    for rank, every, collected in [(4, 4, 9), (5, 3, 11), (16, 1, 33)]:
        _, _, method = _setup("method.collect_every=null", f"method.covariance.rank={rank}")
        assert method.collect_interval(180) == every
        assert method.collections(180) == collected == len({*range(every, 34, every), 33})
        assert collected >= 2 * rank
    _, _, method = _setup("method.collect_every=null", "method.covariance.rank=17")
    assert method.collections(180) == 33 < 34  # as many steps as there are: warned about
    swa = [o for o in SMALL if "covariance" not in o and "collect_every" not in o]
    for choice in ("swa", "diagonal"):
        method = build(compose_cfg(*swa, f"method/swag/covariance={choice}").method, "method")
        assert method.collect_interval(180) == 11 and method.collections(180) == 3
    real = dataclasses.replace(method, sgd=SGDPhase(), covariance=LowRank())  # the defaults
    assert real.collect_interval(54_000) == 210 and real.collections(54_000) == 41


def test_warns_below_twice_the_rank_of_collected_iterates(caplog):
    data, model, method = _setup("method.covariance.rank=5")  # 9 iterates, 2K = 10
    with caplog.at_level("WARNING", logger="bnn_bench"):
        method.check(model, data)  # what fit and the dry run check
    assert "SWAG collects 9 iterates for method.covariance.rank=5" in caplog.text
    assert f"about {low_rank_fraction(9, 5):.2f} of the covariance" in caplog.text
    assert "2 x rank = 10" in caplog.text
    caplog.clear()
    data, model, method = _setup()  # rank 4: 9 >= 8
    with caplog.at_level("WARNING", logger="bnn_bench"):
        method.check(model, data)
    assert "SWAG collects" not in caplog.text


def test_refuses_too_few_iterates_rank_one_a_bad_scale_and_an_unused_refresh():
    data, model, method = _setup("method.collect_every=1000")
    with pytest.raises(UserError, match="method.collect_every"):
        method.fit(jax.random.key(0), model, data)
    with pytest.raises(UserError, match="method/swag/covariance=diagonal"):
        _setup("method.covariance.rank=1")
    for scale in ("0", "-0.5"):
        with pytest.raises(UserError, match="method.covariance.scale must be > 0"):
            _setup(f"method.covariance.scale={scale}")
    data, model, method = _setup("method.bn_refresh_batches=5")  # an MLP: no BatchNorm
    with pytest.raises(UserError, match="method.bn_refresh_batches=5"):
        method.fit(jax.random.key(0), model, data)
    # SWA has no rank: the key is refused, by Hydra or (added with +) by validate
    swa = [o for o in SMALL if "covariance" not in o] + ["method/swag/covariance=swa"]
    with pytest.raises(HydraException, match="method.covariance.rank"):
        compose_cfg(*swa, "method.covariance.rank=3")
    with pytest.raises(HydraException, match="method.covariance.scale"):
        compose_cfg(*swa, "method.covariance.scale=1")
    with pytest.raises(UserError, match="Unknown key 'method.covariance.rank'"):
        validate(compose_cfg(*swa, "+method.covariance.rank=3"))


# ------------------------------------------------------------------ checkpoint and resume

# MAP: 4 epochs of 7 steps (28); SGD: 3 epochs of 7 steps in chunks of at most 3, ending at
# every collection (5, 10, 15, 20, 21) and epoch end: 3, 5, 7, 10, 13, 14, 15, 18, 20, 21
RESUME = [
    *tiny("swag"),
    "method.sgd.epochs=3",
    "method.sgd.batch_size=64",
    "method.sgd.chunk_size=3",
    "method.collect_every=5",
    "method.covariance.rank=3",
    "method.covariance.members=4",
    "checkpoint.every=1",
    "eval.plots=false",
]
SGD_ENDS = [3, 5, 7, 10, 13, 14, 15, 18, 20, 21]


def _history(run_dir):
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "swag/loss" in r]


def _results(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        k: v
        for k, v in metrics.items()
        if not k.startswith(("time/", "cost/compile", "cost/attempts"))
    }


def test_sgd_phase_preempted_then_resumed_equals_an_uninterrupted_run(tmp_path, caplog):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(compose_cfg(*RESUME), whole)
    assert _history(whole) == [28 + s for s in SGD_ENDS]  # after the MAP's 28 steps

    stop = [
        "logger._target_=tests.reporting.sigterm_logger.SigtermAt",
        "+logger.step=38",  # the SGD phase's step 10 (a collection)
    ]
    with pytest.raises(Preempted, match="after saving step 10"):
        run(compose_cfg(*RESUME, *stop), parts)
    assert not (parts / "metrics.json").exists()
    saved = sorted(p.name for p in (parts / "checkpoint/resume/swag").iterdir())
    assert saved == ["step_000000010"]

    with caplog.at_level("INFO", logger="bnn_bench"):
        run(compose_cfg(*RESUME), parts)  # resume=auto: the same job, a checkpoint there
    assert "resuming swag from step 10" in caplog.text
    assert "resuming trainer from step 28" in caplog.text  # the MAP is not trained again
    assert _history(parts) == [28 + s for s in SGD_ENDS]  # no SGD step ran twice
    expected, got = _results(whole), _results(parts)
    assert got["swag/collected"] == 5 and got.keys() == expected.keys()
    assert got == expected  # bit-identical metrics, curves included
