"""The likelihoods against closed forms: scipy's densities, the softmax Hessian and the
Gaussian's expected Hessian (by Gauss-Hermite quadrature), computed densely with
``jax.hessian``; the configs and the task check."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial.hermite_e import hermegauss
from scipy import special, stats

from bnn_bench.config import build, validate
from bnn_bench.errors import UserError
from bnn_bench.likelihoods import Categorical, Gaussian, LearnedNoise
from tests.conftest import compose_cfg

pytestmark = pytest.mark.unit

NOISES = ["fixed", "learned", "heteroscedastic"]


def _outputs(noise: str, b: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Outputs (B, K) for ``noise`` and targets (B,)."""
    rng = np.random.default_rng(seed)
    k = 1 if noise == "fixed" else 2
    out = rng.normal(size=(b, k)).astype(np.float32)
    if noise == "learned":  # LearnedNoise's log σ column is one value
        out[:, 1] = -0.3
    return out, rng.normal(size=b).astype(np.float32)


def _sigma(lik: Gaussian, out: np.ndarray) -> np.ndarray:
    """σ per example, written out from the docstring's definition."""
    if lik.noise == "fixed":
        return np.full(out.shape[0], lik.sigma)
    if lik.noise == "learned":
        return np.exp(out[:, 1])
    return np.exp(out[:, 1]) * lik.sigma


# --------------------------------------------------------------------------- categorical


def test_categorical_log_lik_member_and_loss():
    rng = np.random.default_rng(0)
    out = rng.normal(size=(6, 4)).astype(np.float32) * 3
    y = rng.integers(0, 4, 6)
    lik = Categorical()
    ref = out[np.arange(6), y] - special.logsumexp(out.astype(np.float64), axis=-1)
    np.testing.assert_allclose(lik.log_lik(jnp.asarray(out), jnp.asarray(y)), ref, rtol=1e-5)
    np.testing.assert_allclose(lik.loss(out, y), -ref.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        lik.member(out), out - special.logsumexp(out.astype(np.float64), -1, keepdims=True), 1e-5
    )
    assert lik.outputs(10) == 10 and lik.task == "classification"
    assert float(lik.score(out, y)) == pytest.approx(np.mean(out.argmax(-1) == y))


def test_categorical_fisher_is_the_softmax_hessian():
    rng = np.random.default_rng(1)
    out = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 5))
    lik = Categorical()
    dense = jax.vmap(jax.hessian(lambda o, t: -lik.log_lik(o[None], t[None])[0]))(out, y)
    np.testing.assert_allclose(lik.fisher(out), dense, atol=1e-6)
    p = special.softmax(np.asarray(out, np.float64), -1)
    np.testing.assert_allclose(lik.fisher(out), [np.diag(q) - np.outer(q, q) for q in p], atol=1e-6)


def _with_noise(noise):
    """(likelihood, outputs (7, K), targets (7,)) for the categorical (noise None) or the
    Gaussian with that noise."""
    if noise is None:
        rng = np.random.default_rng(3)
        return Categorical(), rng.normal(size=(7, 4)).astype(np.float32), rng.integers(0, 4, 7)
    out, y = _outputs(noise)
    return Gaussian(noise=noise, sigma=0.7), out, y


@pytest.mark.parametrize("noise", [None, *NOISES])
def test_fisher_factor_product_and_residual_against_dense_forms(noise):
    """What GGN and the empirical Fisher ask of a likelihood (methods/laplace/curvature.py):
    L Lᵀ = fisher, the product = fisher @ v, the residual = −∇ log p by jax.grad of
    log_lik; the categorical's closed forms equal the generic ones of the base class."""
    lik, out, y = _with_noise(noise)
    out, y = jnp.asarray(out), jnp.asarray(y)
    fisher = np.asarray(lik.fisher(out), np.float64)
    factor = np.asarray(lik.fisher_factor(out), np.float64)
    np.testing.assert_allclose(factor @ factor.transpose(0, 2, 1), fisher, atol=1e-6)
    v = jnp.asarray(np.random.default_rng(4).normal(size=out.shape), jnp.float32)
    np.testing.assert_allclose(
        lik.fisher_product(out, v), np.einsum("bij,bj->bi", fisher, v), atol=1e-5
    )
    grad = jax.vmap(jax.grad(lambda o, t: -lik.log_lik(o[None], t[None])[0]))(out, y)
    np.testing.assert_allclose(lik.residual(out, y), grad, rtol=1e-5, atol=1e-6)
    if noise is None:  # the closed forms against the base class's generic ones
        base = super(Categorical, lik)
        generic = np.asarray(base.fisher_factor(out), np.float64)
        np.testing.assert_allclose(generic @ generic.transpose(0, 2, 1), fisher, atol=1e-6)
        np.testing.assert_allclose(base.residual(out, y), lik.residual(out, y), atol=1e-6)
        np.testing.assert_allclose(
            base.fisher_product(out, v), lik.fisher_product(out, v), atol=1e-6
        )


def test_categorical_mixture_is_the_mean_probability():
    rng = np.random.default_rng(2)
    outs = rng.normal(size=(3, 8, 4)).astype(np.float32)
    y = rng.integers(0, 4, 8)
    nll, acc = Categorical().mixture(jnp.asarray(outs), jnp.asarray(y))
    probs = special.softmax(outs.astype(np.float64), -1).mean(0)
    assert float(nll) == pytest.approx(-np.log(probs[np.arange(8), y]).mean(), rel=1e-5)
    assert float(acc) == pytest.approx(np.mean(probs.argmax(-1) == y))


# --------------------------------------------------------------------------- gaussian


@pytest.mark.parametrize("noise", NOISES)
def test_gaussian_log_lik_and_member_against_scipy(noise):
    lik = Gaussian(noise=noise, sigma=0.7)
    out, y = _outputs(noise)
    sigma = _sigma(lik, out)
    ref = stats.norm.logpdf(y, loc=out[:, 0], scale=sigma)
    np.testing.assert_allclose(lik.log_lik(jnp.asarray(out), jnp.asarray(y)), ref, rtol=1e-5)
    np.testing.assert_allclose(lik.loss(out, y), -ref.mean(), rtol=1e-5)
    member = np.asarray(lik.member(jnp.asarray(out)))
    assert member.shape == (7, 2)
    np.testing.assert_allclose(member[:, 0], out[:, 0])
    np.testing.assert_allclose(member[:, 1], np.log(sigma), rtol=1e-5, atol=1e-6)
    assert lik.outputs(1) == (2 if noise == "heteroscedastic" else 1)
    rmse = np.sqrt(np.mean((out[:, 0] - y) ** 2))
    assert float(lik.score(out, y)) == pytest.approx(rmse, rel=1e-5)


@pytest.mark.parametrize("noise", NOISES)
def test_gaussian_fisher_is_the_expected_hessian(noise):
    """E_{y ~ N(μ, σ²)} of the dense Hessian of -log p(y | out) w.r.t. out, by
    Gauss-Hermite quadrature (exact: the Hessian is a polynomial of degree 2 in y)."""
    lik = Gaussian(noise=noise, sigma=0.7)
    out, _ = _outputs(noise, b=4)
    if noise == "learned":  # LearnedNoise's log σ is an output like the heteroscedastic head's
        out[:, 1] = np.array([-0.3, 0.2, 0.0, 0.5])
    sigma = _sigma(lik, out)
    nodes, weights = hermegauss(5)
    weights = weights / weights.sum()
    hess = jax.hessian(lambda o, t: -lik.log_lik(o[None], t[None])[0])
    expected = sum(
        w * np.asarray(jax.vmap(hess)(jnp.asarray(out), jnp.asarray(out[:, 0] + z * sigma)))
        for z, w in zip(nodes, weights, strict=True)
    )
    fisher = np.asarray(lik.fisher(jnp.asarray(out)))
    np.testing.assert_allclose(fisher, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fisher[:, 0, 0], 1 / sigma**2, rtol=1e-5)
    if noise != "fixed":
        np.testing.assert_allclose(fisher[:, 1, 1], 2.0)


def test_gaussian_mixture_against_scipy():
    lik = Gaussian(noise="heteroscedastic", sigma=1.0)
    rng = np.random.default_rng(3)
    outs = rng.normal(size=(4, 9, 2)).astype(np.float32)
    y = rng.normal(size=9).astype(np.float32)
    nll, rmse = lik.mixture(jnp.asarray(outs), jnp.asarray(y))
    dens = stats.norm.pdf(y, loc=outs[..., 0], scale=np.exp(outs[..., 1])).mean(0)
    assert float(nll) == pytest.approx(-np.log(dens).mean(), rel=1e-5)
    assert float(rmse) == pytest.approx(np.sqrt(np.mean((outs[..., 0].mean(0) - y) ** 2)), 1e-5)


class _Linear(nn.Module):
    """A net as the models are: ``__call__(x, train)``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(1)(x)


def test_learned_noise_is_one_parameter():
    net = LearnedNoise(_Linear(), init_log_sigma=np.log(0.5))
    x = jnp.ones((3, 2))
    params = net.init(jax.random.key(0), x)["params"]
    assert set(params) == {"net", "log_noise"} and params["log_noise"].shape == ()
    out = net.apply({"params": params}, x)
    assert out.shape == (3, 2)
    np.testing.assert_allclose(out[:, 1], np.log(0.5), rtol=1e-6)
    lik = Gaussian(noise="learned", sigma=0.5)
    assert isinstance(lik.wrap(_Linear()), LearnedNoise)
    assert not isinstance(Gaussian().wrap(_Linear()), LearnedNoise)


def test_gaussian_refuses_bad_values():
    with pytest.raises(UserError, match="likelihood.noise must be one of"):
        Gaussian(noise="learnt")
    with pytest.raises(UserError, match="likelihood.sigma must be > 0"):
        Gaussian(sigma=0.0)
    with pytest.raises(UserError, match="one target"):
        Gaussian().outputs(3)


# --------------------------------------------------------------------------- configs, task


def test_configs_build_and_the_default_is_categorical():
    cfg = compose_cfg("method=map")
    validate(cfg)
    assert isinstance(build(cfg.likelihood, "likelihood"), Categorical)
    cfg = compose_cfg("method=map", "likelihood=gaussian", "likelihood.noise=learned")
    validate(cfg)
    lik = build(cfg.likelihood, "likelihood")
    assert lik == Gaussian(noise="learned", sigma=1.0)
    with pytest.raises(UserError, match="noise"):
        validate(compose_cfg("method=map", "likelihood=gaussian", "likelihood.noise=other"))


def test_a_task_mismatch_names_the_likelihood_to_choose():
    Categorical().check_task("classification")
    Gaussian().check_task("regression")
    with pytest.raises(UserError, match="choose likelihood=gaussian"):
        Categorical().check_task("regression")
    with pytest.raises(UserError, match="choose likelihood=categorical"):
        Gaussian().check_task("classification")


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("noise", NOISES)
def test_a_linear_model_gives_the_gaussian_members(noise):
    """model=mlp model.hidden=[] (Bayesian linear regression's model) with each noise:
    members (N, 2) = (μ, log σ), μ = w x + b."""
    from bnn_bench.models import build_model
    from bnn_bench.models.mlp import MLP
    from tests.methods.toy_regression import spec

    lik = Gaussian(noise=noise, sigma=0.5)
    model = build_model(MLP(lik.outputs(1), hidden=()), spec(3), "mlp", 8, lik)
    params, state = model.init(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    member = np.asarray(model.log_probs(params, state, x))
    assert member.shape == (5, 2)
    dense = params["net"]["Dense_0"] if noise == "learned" else params["Dense_0"]
    mean = np.asarray(x) @ np.asarray(dense["kernel"])[:, 0] + np.asarray(dense["bias"])[0]
    np.testing.assert_allclose(member[:, 0], mean, rtol=1e-5, atol=1e-6)
    if noise != "heteroscedastic":
        np.testing.assert_allclose(member[:, 1], np.log(0.5), rtol=1e-6)


def test_a_model_without_the_likelihoods_outputs_is_refused():
    from bnn_bench.models import build_model
    from bnn_bench.models.mlp import MLP
    from tests.methods.toy_regression import spec

    with pytest.raises(UserError, match="likelihood=gaussian needs 2"):
        build_model(MLP(1, hidden=()), spec(3), "mlp", 8, Gaussian(noise="heteroscedastic"))


def test_a_run_refuses_a_likelihood_of_another_task_before_any_work(tmp_path):
    """Parts.of, shared by the run and the dry run: the synthetic images are a
    classification dataset."""
    from bnn_bench.parts import Parts

    cfg = compose_cfg("dataset=synthetic", "method=map", "likelihood=gaussian")
    validate(cfg)
    with pytest.raises(UserError, match="choose likelihood=categorical"):
        Parts.of(cfg)
    cfg = compose_cfg("dataset=synthetic", "method=map", "model=mlp", "model.hidden=[]")
    validate(cfg)  # a model with no hidden layer is a valid config
    assert Parts.of(cfg).module.hidden == []
