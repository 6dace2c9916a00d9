"""Curvature products, Lanczos and the Laplace evidence against dense computations.

The reference GGN is built independently: Jacobians from ``jax.jacfwd`` and the
loss Hessian at the logits from ``jax.hessian`` of the cross-entropy, so neither
the closed-form softmax Hessian nor the jvp/vjp path is reused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy.stats import multivariate_normal

from bnn_bench.methods.laplace import curvature as cv
from bnn_bench.methods.laplace import gaussian as gs

pytestmark = pytest.mark.unit

N, D, H, C = 40, 4, 5, 3


def _tiny(n=N, seed=0):
    """A tanh MLP D-H-C on random inputs: (logits_fn, theta (P,), x, y)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    params = {
        "w1": jax.random.normal(k1, (D, H)) / np.sqrt(D),
        "b1": jnp.zeros(H) + 0.1,
        "w2": jax.random.normal(k2, (H, C)),
        "b2": jnp.array([0.2, -0.1, 0.0]),
    }
    theta, unravel = ravel_pytree(params)

    def logits_fn(t, x):
        p = unravel(t)
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    x = jax.random.normal(k3, (n, D))
    y = jax.random.randint(k4, (n,), 0, C)
    return logits_fn, theta, x, y


def _dense_ggn(logits_fn, theta, x, y, weights=None):
    jac = jax.jacfwd(lambda t: logits_fn(t, x))(theta)  # (N, C, P)
    logits = logits_fn(theta, x)
    hess = jax.vmap(
        jax.hessian(lambda lg, yi: optax.softmax_cross_entropy_with_integer_labels(lg, yi))
    )(logits, y)  # (N, C, C)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights)
    jac, hess = np.asarray(jac, np.float64), np.asarray(hess, np.float64)
    return np.einsum("n,ncp,ncd,ndq->pq", w, jac, hess, jac)


def _dense_ef(logits_fn, theta, x, y):
    loss = lambda t: optax.softmax_cross_entropy_with_integer_labels(logits_fn(t, x), y)
    g = np.asarray(jax.jacrev(loss)(theta), np.float64)  # (N, P) per-example gradients
    return g.T @ g


@pytest.mark.parametrize("kind", [cv.GGN(), cv.EmpiricalFisher()], ids=["ggn", "ef"])
def test_mv_diagonal_dense_match_reference(kind):
    logits_fn, theta, x, y = _tiny()
    reference = _dense_ggn if isinstance(kind, cv.GGN) else _dense_ef
    ref = reference(logits_fn, theta, x, y)
    w = jnp.ones(N)
    v = jax.random.normal(jax.random.key(5), theta.shape)
    mv = cv.curvature_mv(logits_fn, theta, x, y, w, v, kind)
    np.testing.assert_allclose(mv, ref @ np.asarray(v), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        cv.diagonal_batch(logits_fn, theta, x, y, w, kind),
        np.diag(ref),
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        cv.dense_batch(logits_fn, theta, x, y, w, kind), ref, rtol=1e-4, atol=1e-5
    )


def test_weights_mask_inputs():
    logits_fn, theta, x, y = _tiny()
    w = jnp.where(jnp.arange(N) < 25, 1.0, 0.0)
    v = jax.random.normal(jax.random.key(6), theta.shape)
    ref = _dense_ggn(logits_fn, theta, x[:25], y[:25])
    np.testing.assert_allclose(
        cv.curvature_mv(logits_fn, theta, x, y, w, v), ref @ np.asarray(v), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        cv.diagonal_batch(logits_fn, theta, x, y, w), np.diag(ref), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("n", [N, 4])  # full-rank GGN; rank 8 < P (Lanczos must restart)
def test_full_rank_lanczos_recovers_dense_posterior(n):
    logits_fn, theta, x, y = _tiny(n)
    g = _dense_ggn(logits_fn, theta, x, y) * 50.0  # scaled "to the data size"
    p = theta.shape[0]
    mv = jax.jit(lambda v: 50.0 * cv.curvature_mv(logits_fn, theta, x, y, jnp.ones(n), v))
    evals, evecs = cv.lanczos(jax.random.key(1), mv, p, rank=p)
    np.testing.assert_allclose(evecs.T @ evecs, np.eye(p), atol=1e-4)
    ref_evals = np.sort(np.linalg.eigvalsh(g))[::-1]
    np.testing.assert_allclose(evals, np.maximum(ref_evals, 0), atol=2e-3 * ref_evals[0])
    curv = gs.Curvature(evecs, evals, jnp.zeros(p))
    for tau in (0.5, 10.0):
        ref_cov = np.linalg.inv(g + tau * np.eye(p))
        np.testing.assert_allclose(
            curv.covariance(tau), ref_cov, rtol=2e-3, atol=2e-3 * np.abs(ref_cov).max()
        )


def test_low_rank_lanczos_keeps_top_eigenvalues():
    logits_fn, theta, x, y = _tiny()
    g = _dense_ggn(logits_fn, theta, x, y)
    mv = jax.jit(lambda v: cv.curvature_mv(logits_fn, theta, x, y, jnp.ones(N), v))
    evals, _ = cv.lanczos(jax.random.key(2), mv, theta.shape[0], rank=25)
    ref = np.sort(np.linalg.eigvalsh(g))[::-1]
    np.testing.assert_allclose(evals[:3], ref[:3], rtol=1e-3)  # extremes converge first


@pytest.mark.parametrize("structure", ["dense", "diagonal", "lanczos"])
def test_sampling_covariance_and_function_variance(structure):
    logits_fn, theta, x, y = _tiny()
    g = _dense_ggn(logits_fn, theta, x, y)
    p = theta.shape[0]
    if structure == "dense":
        curv = gs.from_dense(jnp.asarray(g, jnp.float32))
    elif structure == "diagonal":
        curv = gs.from_diagonal(jnp.asarray(np.diag(g), jnp.float32))
    else:
        mv = lambda v: jnp.asarray(g, jnp.float32) @ v
        evals, evecs = cv.lanczos(jax.random.key(0), mv, p, rank=10)
        curv = gs.Curvature(evecs, evals, jnp.zeros(p))
    tau = 2.0
    cov = np.asarray(curv.covariance(tau), np.float64)
    if structure == "dense":
        np.testing.assert_allclose(cov, np.linalg.inv(g + tau * np.eye(p)), atol=1e-4)
    if structure == "diagonal":
        np.testing.assert_allclose(np.diag(cov), 1 / (np.diag(g) + tau), rtol=1e-5)
    # the sampler's linear map S has S Sᵀ = Σ
    s = np.asarray(curv.sample(tau, jnp.eye(p)), np.float64)
    np.testing.assert_allclose(s.T @ s, cov, atol=1e-5)
    jac = jax.jacfwd(lambda t: logits_fn(t, x[:3]))(theta)  # (3, C, P)
    ref_var = np.einsum("ncp,pq,ncq->nc", jac, cov, jac)
    np.testing.assert_allclose(curv.function_variance(tau, jac), ref_var, rtol=1e-4, atol=1e-6)


def test_log_marginal_likelihood_matches_dense_and_optimum_is_grid_maximiser():
    logits_fn, theta, x, y = _tiny()
    g = _dense_ggn(logits_fn, theta, x, y)
    p = theta.shape[0]
    loglik = -float(optax.softmax_cross_entropy_with_integer_labels(logits_fn(theta, x), y).sum())
    th = np.asarray(theta, np.float64)

    def dense_lml(tau):  # Gaussian integral of likelihood x prior around θ*
        prior = multivariate_normal(np.zeros(p), np.eye(p) / tau).logpdf(th)
        return (
            loglik
            + prior
            + 0.5 * p * np.log(2 * np.pi)
            - 0.5 * np.linalg.slogdet(g + tau * np.eye(p))[1]
        )

    curv = gs.from_dense(jnp.asarray(g, jnp.float32))
    sq = float(jnp.sum(theta**2))
    for tau in (0.01, 1.0, 30.0):
        np.testing.assert_allclose(
            gs.log_marginal_likelihood(curv, tau, loglik, sq), dense_lml(tau), rtol=1e-4
        )
    tau_star, lml_star = gs.maximise_marginal_likelihood(curv, loglik, sq, 1e-4, 1e4)
    grid = np.logspace(-4, 4, 2001)
    dense = np.array([dense_lml(t) for t in grid])
    assert dense_lml(tau_star) >= dense.max() - 1e-3
    assert abs(np.log(tau_star) - np.log(grid[dense.argmax()])) < 0.02
    np.testing.assert_allclose(lml_star, dense_lml(tau_star), rtol=1e-4)
