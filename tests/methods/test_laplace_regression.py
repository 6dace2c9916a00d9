"""Laplace with the Gaussian likelihood against independent references.

* The GGN Σ_i J_iᵀ Λ_i J_i of a tiny MLP, Λ from ``jax.hessian`` of −log p(y | f) averaged
  over y = μ ± σ (the Hessian is quadratic in y − μ, so two points give its expectation
  exactly), J from ``jax.jacfwd``: neither ``Gaussian.fisher`` nor the jvp/vjp path.
* Bayesian linear regression (a network without hidden layer): the Laplace posterior IS
  the exact Gaussian posterior (prior N(0, α⁻¹ I), noise σ²):

      Σ = (α I + X̃ᵀX̃ / σ²)⁻¹,   μ = Σ X̃ᵀy / σ²,   X̃ = [1, X],

  its predictive at x̃ is N(x̃ᵀμ, x̃ᵀΣx̃ + σ²), and its evidence is
  log N(y; 0, X̃X̃ᵀ/α + σ² I). Full and KFAC (Λ = 1/σ² is the same for every input, so
  A ⊗ B = X̃ᵀX̃/σ² exactly) must give all three.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree
from scipy import stats
from scipy.optimize import minimize_scalar
from scipy.stats import multivariate_normal

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.likelihoods import Gaussian
from bnn_bench.methods.laplace import (
    GGN,
    KFAC,
    EmpiricalFisher,
    Fixed,
    Full,
    Laplace,
    LaplacePosterior,
    LastLayer,
    Linearised,
    MargLik,
    Predictive,
    Probit,
    sampled_logits,
)
from bnn_bench.methods.laplace import curvature as cv
from bnn_bench.methods.laplace.gaussian import log_marginal_likelihood
from bnn_bench.methods.laplace.passes import log_likelihood
from bnn_bench.methods.training import Trainer
from bnn_bench.models import build_model
from bnn_bench.models.mlp import MLP
from tests.methods import toy_regression

pytestmark = pytest.mark.unit

N, D, H = 30, 3, 4
NOISES = ["fixed", "learned", "heteroscedastic"]


def _tiny(noise: str, seed: int = 0):
    """A tanh MLP D-H-K on random inputs, K the likelihood's outputs (learned noise: the
    μ head plus a log σ parameter, as ``LearnedNoise``): (likelihood, out_fn, theta, x, y)."""
    lik = Gaussian(noise, 0.7)
    k = lik.outputs(1)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    params = {
        "w1": jax.random.normal(k1, (D, H)) / np.sqrt(D),
        "b1": jnp.zeros(H) + 0.1,
        "w2": jax.random.normal(k2, (H, k)),
        "b2": jnp.full((k,), 0.2),
        "log_noise": jnp.asarray(-0.3),
    }
    if noise != "learned":
        del params["log_noise"]
    theta, unravel = ravel_pytree(params)

    def out_fn(t, x):
        p = unravel(t)
        out = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        if noise == "learned":
            out = jnp.concatenate([out, jnp.broadcast_to(p["log_noise"], out.shape)], -1)
        return out

    x = jax.random.normal(k3, (N, D))
    y = jax.random.normal(k4, (N,))
    return lik, out_fn, theta, x, y


def _dense_ggn(lik, out_fn, theta, x, weights=None):
    """Σ_i w_i J_iᵀ E_y[∇²_f −log p(y | f_i)] J_i (float64)."""

    @jax.jit
    def parts(theta, x):
        out = out_fn(theta, x)
        jac = jax.jacfwd(lambda t: out_fn(t, x))(theta)  # (N, K, P)
        mean, log_sigma = lik.mean_log_sigma(out)
        nll = lambda f, y: -lik.log_lik(f[None], y[None])[0]
        hess = jax.vmap(jax.hessian(nll))
        sigma = jnp.exp(log_sigma)
        return jac, 0.5 * (hess(out, mean + sigma) + hess(out, mean - sigma))  # (N, K, K)

    jac, lam = (np.asarray(a, np.float64) for a in parts(theta, x))
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, np.float64)
    return np.einsum("n,nkp,nkl,nlq->pq", w, jac, lam, jac)


def _dense_ef(lik, out_fn, theta, x, y):
    """Σ_i g_i g_iᵀ, g_i = ∇_θ −log p(y_i | f(x_i, θ)) by ``jax.jacrev``."""
    g = jax.jacrev(lambda t: -lik.log_lik(out_fn(t, x), y))(theta)
    g = np.asarray(g, np.float64)  # (N, P)
    return g.T @ g


@pytest.mark.parametrize(
    "noise,kind",
    [(noise, GGN()) for noise in NOISES] + [("heteroscedastic", EmpiricalFisher())],
    ids=[f"ggn-{noise}" for noise in NOISES] + ["ef-heteroscedastic"],
)
def test_gaussian_curvature_matches_dense_reference(noise, kind):
    lik, out_fn, theta, x, y = _tiny(noise)
    if isinstance(kind, GGN):
        ref = _dense_ggn(lik, out_fn, theta, x)
    else:
        ref = _dense_ef(lik, out_fn, theta, x, y)
    w = jnp.ones(N)
    v = jax.random.normal(jax.random.key(5), theta.shape)

    @jax.jit
    def products(theta, x, y, w, v):
        return (
            cv.curvature_mv(out_fn, theta, x, y, w, v, kind, lik),
            cv.diagonal_batch(out_fn, theta, x, y, w, kind, lik),
            cv.dense_batch(out_fn, theta, x, y, w, kind, lik),
        )

    mv, diag, dense = products(theta, x, y, w, v)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(
        mv, ref @ np.asarray(v, np.float64), atol=2e-5 * scale * np.abs(v).sum()
    )
    np.testing.assert_allclose(diag, np.diag(ref), atol=1e-5 * scale)
    np.testing.assert_allclose(dense, ref, atol=1e-5 * scale)
    if noise != "fixed":  # the log σ output's Fisher, 2 per input, is in G
        assert np.abs(ref).max() > 1.0


def test_gaussian_ggn_scales_with_the_noise_precision():
    """Λ = 1/σ² on μ: halving σ multiplies the fixed-noise GGN by 4 (and the labels do
    not enter it)."""
    lik, out_fn, theta, x, y = _tiny("fixed")
    w = jnp.ones(N)
    g1 = cv.dense_batch(out_fn, theta, x, y, w, GGN(), lik)
    g2 = cv.dense_batch(out_fn, theta, x, -y, w, GGN(), Gaussian("fixed", 0.35))
    np.testing.assert_allclose(g2, 4.0 * g1, rtol=1e-5, atol=1e-6 * np.abs(g1).max())


# --------------------------------------------------------------------- linear regression

ALPHA, SIGMA = 2.0, 0.5  # prior precision α (prior N(0, α⁻¹ I)), noise σ


def regression_data(n: int = 40, d: int = 2, seed: int = 0, n_test: int = 8) -> Dataset:
    """y = x ᵀ w + b + σ ε on standard normal x, a regression ``Dataset`` (float32)."""
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=d), 0.3
    x = rng.normal(size=(n + n_test, d)).astype(np.float32)
    y = (x @ w + b + SIGMA * rng.normal(size=n + n_test)).astype(np.float32)
    train = Split(jnp.asarray(x[:n]), jnp.asarray(y[:n]))
    test = Split(jnp.asarray(x[n:]), jnp.asarray(y[n:]))
    return Dataset(toy_regression.spec(d), train, test)


def design(x) -> np.ndarray:
    """X̃ = [1, X] (N, D+1), float64: the columns in the order of the flat parameters
    [bias; kernel] (``ravel_pytree`` sorts the keys)."""
    return np.concatenate([np.ones((len(x), 1)), np.asarray(x, np.float64)], 1)


def blr_posterior(x, y, alpha=ALPHA, sigma=SIGMA):
    """The closed form: μ (D+1,), Σ (D+1, D+1) over [b; w], float64."""
    xt = design(x)
    cov = np.linalg.inv(alpha * np.eye(xt.shape[1]) + xt.T @ xt / sigma**2)
    return cov @ xt.T @ np.asarray(y, np.float64) / sigma**2, cov


def linear_model(data: Dataset, noise: str = "fixed"):
    """``model=mlp model.hidden=[]`` with the Gaussian likelihood: f(x) = xᵀw + b."""
    return build_model(MLP(num_classes=1, hidden=()), data.spec, "mlp", 100, Gaussian(noise, SIGMA))


def _at(model, mu) -> LaplacePosterior:
    """A posterior centred at the closed-form mean (the MAP of this convex problem)."""
    params, state = model.init(jax.random.key(0))
    kernel = jnp.asarray(mu[1:, None], jnp.float32)
    params = {"Dense_0": {"kernel": kernel, "bias": jnp.asarray(mu[:1], jnp.float32)}}
    return LaplacePosterior.at_map(model, params, state, None)


@pytest.mark.parametrize("structure", [Full(), KFAC()], ids=["full", "kfac"])
def test_linear_laplace_is_the_exact_posterior(structure):
    data = regression_data()
    x, y, xs = data.train.x, data.train.y, data.test.x
    mu, cov = blr_posterior(x, y)
    post = _at(linear_model(data), mu)
    # the flat order is [bias; kernel] = [b; w], as the closed form's
    np.testing.assert_allclose(post.theta, mu, rtol=1e-6)
    idx = jnp.arange(len(y))[None]
    curv = structure.fit(jax.random.key(0), post, data.train, idx, jnp.ones(idx.shape), 1.0, GGN())
    post = post.replace(curvature=curv, prior_precision=jnp.asarray(ALPHA))
    np.testing.assert_allclose(curv.covariance(ALPHA), cov, rtol=1e-4, atol=1e-7)

    # predictive: members f(x, θ*) + J δ with δ = Σ^{1/2} z, the symmetric root
    z = jax.random.normal(jax.random.key(1), (5, mu.size))
    root = np.real(scipy.linalg.sqrtm(cov))
    xt = design(xs)
    want = (mu + np.asarray(z, np.float64) @ root) @ xt.T  # (5, N)
    for linearised in (True, False):  # a linear model: both are exact
        got = sampled_logits(post, xs, z, linearised=linearised)[..., 0]
        np.testing.assert_allclose(got, want, atol=1e-4)
    jac = jnp.asarray(xt, jnp.float32)[:, None, :]  # J of f = x̃ᵀθ: (N, 1, P)
    np.testing.assert_allclose(
        curv.function_variance(ALPHA, jac)[:, 0], np.einsum("np,pq,nq->n", xt, cov, xt), rtol=1e-4
    )
    members = next(Linearised(members=5).member_log_probs(jax.random.key(2), post, xs, 5))
    assert members.shape == (5, len(xs), 2)  # (mean, log σ)
    np.testing.assert_allclose(members[..., 1], np.log(SIGMA), rtol=1e-6)


def test_linear_laplace_evidence_is_the_exact_evidence():
    """log p(y | α) of the Laplace approximation (with the Gaussian log-likelihood at θ*)
    equals log N(y; 0, X̃X̃ᵀ/α + σ² I), and marglik picks the closed form's maximiser."""
    data = regression_data()
    x, y = data.train.x, data.train.y
    xt = design(x)

    def exact(alpha):
        c = xt @ xt.T / alpha + SIGMA**2 * np.eye(len(y))
        return multivariate_normal(np.zeros(len(y)), c).logpdf(np.asarray(y, np.float64))

    mu, _ = blr_posterior(x, y)  # μ at α = ALPHA: the MAP of that prior
    post = _at(linear_model(data), mu)
    idx = jnp.arange(len(y))[None]
    w = jnp.ones(idx.shape)
    curv = Full().fit(jax.random.key(0), post, data.train, idx, w, 1.0, GGN())
    loglik = float(log_likelihood(post, data.train, idx, w))
    sq = float(np.sum(mu**2))
    np.testing.assert_allclose(
        float(log_marginal_likelihood(curv, ALPHA, loglik, sq)), exact(ALPHA), rtol=1e-5
    )
    # marglik over τ at a fixed θ*: the evidence is exact only at τ = α (θ* = μ(α)), so
    # compare with the same Laplace formula written out in float64
    tau, _ = MargLik().choose(None, post.replace(curvature=curv), loglik, sq, None, None, 1)
    g = xt.T @ xt / SIGMA**2
    lml = lambda t: (
        loglik
        - 0.5 * t * sq
        + 0.5 * mu.size * np.log(t)
        - 0.5 * np.linalg.slogdet(g + t * np.eye(mu.size))[1]
    )
    ref = minimize_scalar(lambda u: -lml(np.exp(u)), bounds=(-9, 14), method="bounded").x
    np.testing.assert_allclose(np.log(tau), ref, atol=1e-3)


def test_val_nll_of_the_gaussian_mixture_shortcut_and_streamed():
    """The validation NLL a τ grid reads: the low-rank shortcut (one pass of k + S
    tangents) equals the streamed members', and both equal the Gaussian mixture's NLL
    written out with scipy from the members."""
    data = regression_data(seed=1)
    mu, _ = blr_posterior(data.train.x, data.train.y)
    post = _at(linear_model(data), mu)
    idx = jnp.arange(data.train.size)[None]
    curv = Full().fit(jax.random.key(0), post, data.train, idx, jnp.ones(idx.shape), 1.0, GGN())
    post = post.replace(curvature=curv)
    assert curv.low_rank  # a full eigendecomposition, d = 0: the shortcut applies
    val, pred, key = data.test, Linearised(members=12), jax.random.key(3)
    shortcut = pred.nll_fn(key, post, val, 12)
    streamed = Predictive.nll_fn(pred, key, post, val, 12)
    for tau in (0.1, ALPHA, 30.0):
        p = post.replace(prior_precision=jnp.asarray(tau, jnp.float32))
        members = np.concatenate(list(pred.member_log_probs(key, p, val.x, 12)), 0)  # (S, N, 2)
        dens = stats.norm.pdf(
            np.asarray(val.y, np.float64), members[..., 0], np.exp(members[..., 1])
        )
        ref = -np.mean(np.log(dens.mean(0)))
        np.testing.assert_allclose(streamed(tau), ref, rtol=1e-5)
        np.testing.assert_allclose(shortcut(tau), ref, rtol=1e-4)


# --------------------------------------------------------------------- refusals


def test_probit_is_refused_for_regression_by_name():
    model = linear_model(regression_data())
    with pytest.raises(UserError, match="predictive=probit.*classification only"):
        Probit().check(model.likelihood)
    Linearised().check(model.likelihood)  # the GLM predictive is not


@pytest.mark.parametrize(
    "structure,match",
    [(LastLayer(), "structure=last_layer"), (KFAC(), "structure=kfac")],
    ids=["last_layer", "kfac"],
)
def test_structures_without_log_noise_are_refused_with_learned_noise(structure, match):
    model = linear_model(regression_data(), noise="learned")
    with pytest.raises(UserError, match=f"{match}.*log_noise"):
        structure.covers(model)
    Full().covers(model)  # covers log_noise like any parameter


def test_laplace_check_refuses_probit_before_training():
    data = regression_data()
    method = Laplace(
        trainer=Trainer(epochs=1), structure=Full(), predictive=Probit(), prior_precision=Fixed()
    )
    with pytest.raises(UserError, match="probit"):
        method.check(linear_model(data), data)


def test_module_without_hidden_layer_is_one_dense_layer():
    """The linear model's parameters are one Dense layer's (the closed form's [w; b])."""
    params, _ = linear_model(regression_data()).init(jax.random.key(0))
    assert set(params) == {"Dense_0"}
    assert isinstance(MLP(num_classes=1, hidden=()), nn.Module)
