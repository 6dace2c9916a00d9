"""The ``laplace`` method through its public entry points: fit, members, run, init_from.

A very small network (6x6 synthetic inputs, an MLP with 3 hidden units, 3 classes)
keeps P near a hundred, so every structure can be checked against the dense GGN
built from ``jax.jacfwd`` on the same training split.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from bnn_bench.config import build, validate
from bnn_bench.errors import UserError
from bnn_bench.methods.laplace import (
    Diagonal,
    Fixed,
    Full,
    Lanczos,
    LastLayer,
    Linearised,
    MargLik,
    Predictive,
    Probit,
    ValNLL,
    WeightSpace,
    sampled_logits,
)
from bnn_bench.methods.laplace.curvature import GGN, EmpiricalFisher
from bnn_bench.models import build_model
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg

pytestmark = pytest.mark.e2e

SMALL = [
    *TINY,
    "dataset.shape=[6,6,1]",
    "dataset.num_classes=3",
    "dataset.train_size=72",
    "dataset.test_size=32",
    "model.hidden=[3]",
    "trainer.epochs=30",
    "trainer.batch_size=16",
    "method=laplace",
    "method.curvature_batch_size=16",
]


@pytest.fixture(scope="module")
def map_dir(tmp_path_factory):
    """A finished tiny `map` run; the Laplace fits below start from its network."""
    out = tmp_path_factory.mktemp("map")
    run(compose_cfg(*[o for o in SMALL if not o.startswith("method")], "method=map"), out)
    return out


def _fit(map_dir, *overrides):
    cfg = compose_cfg(*SMALL, f"method.init_from={map_dir}", *overrides)
    data = build(cfg.dataset, "dataset").load()
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(module, data.spec, "mlp", cfg.eval.batch_size)
    method = build(cfg.method, "method")
    post = method.fit(jax.random.key(0), model, data)
    return data, method, post


def _dense_ggn(post, split):
    """Σ_i J_iᵀ H_i J_i over the whole split (float64), H_i from jax.hessian of the loss."""
    f = lambda t: post.logits_fn(t, split.x)
    jac = np.asarray(jax.jacfwd(f)(post.theta), np.float64)  # (N, C, P)
    hess = jax.vmap(jax.hessian(optax.softmax_cross_entropy_with_integer_labels))(
        f(post.theta), split.y
    )
    return np.einsum("ncp,ncd,ndq->pq", jac, np.asarray(hess, np.float64), jac)


def _curvature_matrix(curv):
    u, s = np.asarray(curv.basis, np.float64), np.asarray(curv.eigvals, np.float64)
    return (u * s) @ u.T + np.diag(np.asarray(curv.diag, np.float64))


@pytest.fixture(scope="module")
def lanczos_fit(map_dir):
    return _fit(map_dir, "method.prior_precision=1.0", "method.structure.rank=20")


@pytest.mark.parametrize("structure", ["full", "diagonal", "last_layer", "lanczos"])
def test_curvature_over_the_training_split_matches_dense_ggn(map_dir, structure):
    extra = ["method.structure.rank=200"] if structure == "lanczos" else []  # rank >= P: exact
    data, _, post = _fit(
        map_dir, f"method/laplace/structure={structure}", "method.prior_precision=1.0", *extra
    )
    p = post.theta.shape[0]
    ref = _dense_ggn(post, data.train)
    got = _curvature_matrix(post.curvature)
    scale = np.abs(ref).max()
    if structure == "diagonal":
        np.testing.assert_allclose(np.diag(got), np.diag(ref), atol=1e-4 * scale)
        np.testing.assert_allclose(got - np.diag(np.diag(got)), 0.0)
    else:
        np.testing.assert_allclose(got, ref, atol=2e-3 * scale)
    if structure == "last_layer":
        assert p == 3 * 3 + 3  # the last Dense layer: 3 hidden units x 3 classes + biases
    else:
        assert p == 6 * 6 * 3 + 3 + 3 * 3 + 3


def test_linearised_mean_is_the_map_output(lanczos_fit):
    data, _, post = lanczos_fit
    x = data.test.x
    z = jax.random.normal(jax.random.key(3), (4, post.theta.shape[0]))
    f_map = post.logits_fn(post.theta, x)
    plus = sampled_logits(post, x, z, linearised=True)
    minus = sampled_logits(post, x, -z, linearised=True)
    # f + Jδ and f − Jδ: the function-space Gaussian is centred on the MAP logits
    np.testing.assert_allclose((plus + minus) / 2, jnp.broadcast_to(f_map, plus.shape), atol=1e-4)
    assert float(jnp.abs(plus - f_map).max()) > 1e-2  # and the members do differ from it
    # the network itself is not linear in δ, so "weights" members are not centred exactly
    wplus = sampled_logits(post, x, z, linearised=False)
    wminus = sampled_logits(post, x, -z, linearised=False)
    assert float(jnp.abs((wplus + wminus) / 2 - f_map).max()) > 1e-6


@pytest.mark.parametrize("predictive", ["linearised", "weights", "probit"])
def test_members_collapse_onto_map_as_prior_precision_grows(lanczos_fit, predictive):
    data, method, post = lanczos_fit
    choice = compose_cfg(*SMALL, f"method/laplace/predictive={predictive}").method.predictive
    method = dataclasses.replace(method, predictive=build(choice, "method.predictive"))
    x = data.test.x
    map_probs = jax.nn.softmax(post.logits_fn(post.theta, x), -1)
    wide = jnp.exp(jnp.concatenate(list(method.member_log_probs(jax.random.key(1), post, x))))
    assert wide.shape[0] == (1 if predictive == "probit" else 30)
    assert float(jnp.abs(wide.mean(0) - map_probs).max()) > 1e-2  # τ = 1 is visibly wide
    tight = post.replace(prior_precision=jnp.asarray(1e9, jnp.float32))
    probs = jnp.exp(jnp.concatenate(list(method.member_log_probs(jax.random.key(1), tight, x))))
    np.testing.assert_allclose(probs, jnp.broadcast_to(map_probs, probs.shape), atol=1e-3)


def test_marglik_picks_the_dense_evidence_maximiser(map_dir):
    data, _, post = _fit(
        map_dir,
        "method/laplace/structure=full",
        "method/laplace/prior_precision=marglik",
    )
    info = post.info
    ref = _dense_ggn(post, data.train)
    p = ref.shape[0]
    logits = post.logits_fn(post.theta, data.train.x)
    loglik = -float(optax.softmax_cross_entropy_with_integer_labels(logits, data.train.y).sum())
    sq = float(jnp.sum(post.theta.astype(jnp.float64) ** 2))

    def lml(tau):  # log p(D|θ*) + log N(θ*; 0, I/τ) + P/2 log 2π − ½ log det(G + τI)
        return (
            loglik
            - 0.5 * tau * sq
            + 0.5 * p * np.log(tau)
            - 0.5 * np.linalg.slogdet(ref + tau * np.eye(p))[1]
        )

    grid = np.logspace(-4, 6, 1001)
    values = np.array([lml(t) for t in grid])
    tau = info["laplace/prior_precision"]
    assert lml(tau) >= values.max() - 1e-3
    assert abs(np.log(tau) - np.log(grid[values.argmax()])) < 0.05
    np.testing.assert_allclose(info["laplace/log_marglik"], lml(tau), rtol=1e-3)


class _KnownCurve(Predictive):
    """A predictive whose validation NLL is a known function of log τ (and counts calls)."""

    members = 1

    def __init__(self, curve):
        self.curve, self.calls = curve, 0

    def nll_fn(self, key, post, val, members_per_chunk):
        def nll(tau):
            self.calls += 1
            return self.curve(np.log(tau))

        return nll


@pytest.mark.parametrize("optimum", [0.756, 1.2e-4, 2.0e-4, 5.0e5])
def test_val_nll_refines_the_grid_optimum_to_the_dense_grid_optimum(optimum):
    """21 points over 10 decades put the optimum of an asymmetric curve on a grid point (1.0
    for 0.756); the refinement between its neighbours finds a 100,001-point grid's."""

    def curve(u):  # smooth, asymmetric in log τ, minimal at log(optimum)
        v = u - np.log(optimum) - np.log(2) / 3
        return np.logaddexp(2 * v, -v) + 0.3

    dense = np.exp(np.linspace(np.log(1e-4), np.log(1e6), 100_001))
    ref = dense[np.argmin(curve(np.log(dense)))]
    predictive = _KnownCurve(curve)
    tau, info = ValNLL().choose(None, None, 0.0, 0.0, None, predictive, 1)
    assert abs(np.log(tau) - np.log(ref)) < 0.01  # REFINE_XATOL: τ to about 1%
    assert info["laplace/val_nll"] <= curve(np.log(ref)) + 1e-4
    assert predictive.calls <= 21 + 20
    grid = np.exp(np.linspace(np.log(1e-4), np.log(1e6), 21))
    assert abs(np.log(grid[np.argmin(curve(np.log(grid)))]) - np.log(ref)) > 0.1  # not a grid point


@pytest.mark.slow
def test_val_nll_picks_the_dense_grid_minimiser(tmp_path):
    """An over-fitted MAP (16 hidden units, 100 epochs on 72 images) whose probit
    validation NLL has an interior minimum in τ: the 5-point grid's best point, refined,
    is a 301-point grid's minimiser."""
    wider = ["model.hidden=[16]", "trainer.epochs=100"]
    run(
        compose_cfg(*[o for o in SMALL if not o.startswith("method")], "method=map", *wider),
        tmp_path,
    )
    data, method, post = _fit(
        tmp_path,
        *wider,
        "method/laplace/structure=last_layer",
        "method/laplace/prior_precision=val_nll",
        "method.prior_precision.grid_size=5",
        "method.prior_precision.prior_range=[1.0e-2,1.0e2]",
        "method/laplace/predictive=probit",
    )
    info = post.info

    def nll(tau):
        p = post.replace(prior_precision=jnp.asarray(tau, jnp.float32))
        probs = jnp.exp(next(method.member_log_probs(jax.random.key(0), p, data.val.x))[0])
        return float(-jnp.log(probs[jnp.arange(data.val.size), data.val.y]).mean())

    dense = np.logspace(-1, 2, 301)
    nlls = np.array([nll(t) for t in dense])
    best = dense[nlls.argmin()]
    assert 0 < nlls.argmin() < len(dense) - 1  # an interior optimum, so the test can tell
    tau = info["laplace/prior_precision"]
    assert abs(np.log(tau) - np.log(best)) < 0.03
    assert info["laplace/val_nll"] <= nlls.min() + 1e-5
    np.testing.assert_allclose(info["laplace/val_nll"], nll(tau), rtol=1e-4)
    assert min(abs(np.log(tau) - np.log(np.logspace(-2, 2, 5)))) > 0.05  # not a grid point


def test_full_refuses_a_large_network_before_training(map_dir):
    with pytest.raises(UserError, match="structure=full"):
        _fit(
            map_dir,
            "method/laplace/structure=full",
            "model.hidden=[64]",
            "dataset.shape=[28,28,1]",
        )


def test_map_checkpoint_feeds_init_from_and_metrics_are_written(map_dir, tmp_path):
    ckpt = map_dir / "checkpoint" / "map.msgpack"
    assert ckpt.is_file()
    cfg = compose_cfg(
        *SMALL,
        f"method.init_from={map_dir}",
        "method.structure.rank=10",
        "method.predictive.members=5",
        "method.prior_precision.grid_size=3",
    )
    metrics = run(cfg, tmp_path / "laplace")
    saved = json.loads((tmp_path / "laplace" / "metrics.json").read_text())
    for key in (
        "laplace/prior_precision",
        "laplace/log_marglik",
        "laplace/time_curvature",
        "time/map",  # the MAP step's seconds, measured by PostHoc.fit
        "test/nll",
        "test/ece",
    ):
        assert key in saved and saved[key] == pytest.approx(metrics[key])
    assert saved["laplace/prior_precision"] > 0
    # the Laplace run starts from the map run's network: its checkpoint holds the same bytes
    assert (tmp_path / "laplace" / "checkpoint" / "map.msgpack").read_bytes() == ckpt.read_bytes()

    with pytest.raises(UserError, match="no checkpoint"):
        compose_and_build(*SMALL, f"method.init_from={tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match="shape"):
        _fit(map_dir, "model.hidden=[5]")


def compose_and_build(*overrides):
    cfg = compose_cfg(*overrides)
    return build(cfg.method, "method")


@pytest.mark.parametrize("predictive", ["linearised", "weights", "probit"])
def test_last_layer_members_from_the_head_inputs_equal_the_whole_forward_pass(map_dir, predictive):
    """A last-layer posterior runs the layers before the head once per input set
    (``with_head_inputs``), not once per chunk of members or per τ: its members and its
    τ search's validation NLL equal those of the whole network's forward pass."""
    data, method, post = _fit(
        map_dir,
        "method/laplace/structure=last_layer",
        f"method/laplace/predictive={predictive}",
        "method.prior_precision=3.0",
        "method.members_per_chunk=4",
    )
    key, x = jax.random.key(5), data.test.x
    _, feats = post.with_head_inputs(x)
    assert feats.shape == (x.shape[0], 3)  # model.hidden=[3]: what the last Dense reads
    fast = jnp.concatenate(list(method.member_log_probs(key, post, x)))
    whole = jnp.concatenate(list(method.predictive.member_log_probs(key, post, x, 4)))
    assert fast.shape == whole.shape == ((1 if predictive == "probit" else 30), 32, 3)
    np.testing.assert_allclose(fast, whole, atol=2e-5)
    # the τ search's validation NLL (from the head inputs) against the whole forward pass
    if predictive != "probit":
        nll_fn = method.predictive.nll_fn(key, post, data.val, 4)
        for tau in (0.3, 30.0):
            p = post.replace(prior_precision=jnp.asarray(tau, jnp.float32))
            chunks = method.predictive.member_log_probs(key, p, data.val.x, 4)
            probs = jnp.exp(jnp.concatenate(list(chunks))).mean(0)
            ref = float(-jnp.log(probs[jnp.arange(data.val.size), data.val.y]).mean())
            np.testing.assert_allclose(nll_fn(tau), ref, rtol=1e-5)


@pytest.mark.parametrize("structure", ["lanczos", "last_layer"])
def test_val_nll_shortcut_equals_streamed_members(map_dir, structure):
    """The τ grid reuses J U and J z (d = 0); it must agree with the members themselves."""
    data, method, post = _fit(
        map_dir,
        f"method/laplace/structure={structure}",
        *(["method.structure.rank=10"] if structure == "lanczos" else []),
        "method.prior_precision=1.0",
        "method.predictive.members=6",
    )
    key = jax.random.key(7)
    fast = method.predictive.nll_fn(key, post, data.val, method.members_per_chunk)
    for tau in (0.3, 30.0):
        p = post.replace(prior_precision=jnp.asarray(tau, jnp.float32))
        probs = jnp.exp(jnp.concatenate(list(method.member_log_probs(key, p, data.val.x)))).mean(0)
        ref = float(-jnp.log(probs[jnp.arange(data.val.size), data.val.y]).mean())
        np.testing.assert_allclose(fast(tau), ref, rtol=1e-4)


@pytest.mark.parametrize(
    "group,choice,target",
    [
        ("structure", "lanczos", Lanczos(rank=100)),
        ("structure", "diagonal", Diagonal()),
        ("structure", "last_layer", LastLayer()),
        ("structure", "full", Full()),
        ("curvature", "ggn", GGN()),
        ("curvature", "empirical_fisher", EmpiricalFisher()),
        ("predictive", "linearised", Linearised(members=30)),
        ("predictive", "weights", WeightSpace(members=30)),
        ("predictive", "probit", Probit()),
        ("prior_precision", "val_nll", ValNLL(grid_size=21, prior_range=(1e-4, 1e6))),
        ("prior_precision", "marglik", MargLik(prior_range=(1e-4, 1e6))),
        ("prior_precision", "fixed", Fixed(value=1.0)),
    ],
)
def test_each_choice_is_its_object(group, choice, target):
    """``method/laplace/<group>=<choice>`` builds that choice's object, with its own keys."""
    cfg = compose_cfg(*SMALL, f"method/laplace/{group}={choice}")
    validate(cfg)
    got = getattr(build(cfg.method, "method"), group)
    assert type(got) is type(target)
    assert {k: tuple(v) if k == "prior_range" else v for k, v in vars(got).items()} == vars(target)


def test_a_key_lives_only_in_its_choice():
    """rank belongs to lanczos: with diagonal it is refused, naming the accepted keys."""
    cfg = compose_cfg(*SMALL, "method/laplace/structure=diagonal")
    OmegaConf.set_struct(cfg, False)  # as a preset's leftover key would arrive
    cfg.method.structure.rank = 10
    with pytest.raises(UserError, match="method.structure.rank"):
        validate(cfg)
    with pytest.raises(HydraException):  # and on the command line, Hydra refuses it
        compose_cfg(*SMALL, "method/laplace/structure=diagonal", "method.structure.rank=10")


def test_a_number_for_prior_precision_is_the_fixed_choice():
    a = build(compose_cfg(*SMALL, "method.prior_precision=1e4").method, "method")
    b = build(
        compose_cfg(
            *SMALL, "method/laplace/prior_precision=fixed", "method.prior_precision.value=1e4"
        ).method,
        "method",
    )
    assert a.prior_precision == b.prior_precision == Fixed(1e4)
    with pytest.raises(UserError, match="method.prior_precision"):
        build(compose_cfg(*SMALL, "method.prior_precision=optimize").method, "method")


def test_init_from_refuses_trainer_keys_and_another_augmentation(map_dir, run_cli):
    """With ``method.init_from`` nothing is trained: a ``trainer.*`` key on the command line
    and a ``dataset.augment`` other than the loaded MAP's (its metrics.json's
    ``data/augment``) are refused, each in one line naming the key; the same command
    without them is accepted."""
    base = [o for o in SMALL if not o.startswith("trainer.")]
    loaded = [*base, f"method.init_from={map_dir}", "dry_run=true"]
    ok = run_cli(*loaded)
    assert ok.returncode == 0, ok.stderr[-2000:]
    keyed = run_cli(*loaded, "trainer.epochs=2")
    assert keyed.returncode == 2
    assert "trainer.epochs: method=laplace loads its MAP network from method.init_from" in (
        keyed.stderr
    )
    augmented = run_cli(*loaded, "dataset.augment=true")
    assert augmented.returncode == 2
    assert "dataset.augment=true: method=laplace loads its MAP network" in augmented.stderr
    assert "trained with dataset.augment=false" in augmented.stderr
