"""Curvature of the loss −log p(y | f) at the network outputs f (``method/laplace/curvature=
ggn|empirical_fisher``), its products, and Lanczos. Pure functions.

Everything here works on flat parameter vectors ``theta`` (P,), a
``logits_fn(theta, x) -> (B, K)`` (the network's outputs: logits, or a Gaussian's mean
and log σ) and the run's likelihood (``bnn_bench.likelihoods``); ``posterior.py`` ravels
the network's parameters (all of them, or the last layer's) into that form.

Curvature (summed over inputs, as laplax's ``create_ggn_mv``):

* GGN: G = Σ_i J_iᵀ Λ_i J_i, J_i = ∂f(x_i)/∂θ (K, P), Λ_i = ``likelihood.fisher(f_i)``
  the Hessian of −log p(y | f) at f, expected over y (Schraudolph, 2002; Martens,
  2020): for the categorical likelihood the cross-entropy's Hessian diag(p_i) − p_i p_iᵀ
  (laplax's ``loss_fn="cross_entropy"``), for the Gaussian 1/σ² on the mean (laplax's
  ``"mse"`` scaled by the noise) and 2 on log σ where log σ is an output.
* empirical Fisher: F = Σ_i g_i g_iᵀ, g_i = J_iᵀ r_i, r_i = −∂ log p(y_i | f_i)/∂f the
  per-example loss gradient at the outputs (p_i − onehot(y_i) for the categorical)
  (Kunstner et al., 2019, on why it can mislead).

Both are Λ_i = L_i L_iᵀ with a small factor L_i (K, R): R = K for the GGN, R = 1 for
the empirical Fisher, so the exact diagonal and the dense matrix come from the R
per-example vector-Jacobian products J_iᵀ L_i, never from a P x P matrix. The
matrix-vector product takes one linearisation (jvp) and its transpose (vjp).
``gaussian.py`` holds the approximations of G built from these and the Gaussians on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from bnn_bench.likelihoods import Categorical, Likelihood

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (theta (P,), x (B, ...)) -> (B, K)


# --------------------------------------------------------------------------- curvature


CATEGORICAL = Categorical()  # the default likelihood of the functions below


@dataclass(frozen=True)
class GGN:
    """The generalised Gauss-Newton: Λ_i = ``likelihood.fisher(f_i)``, the expected Hessian
    of −log p(y | f) at the outputs (``method/laplace/curvature=ggn``); for the categorical
    likelihood the cross-entropy's Hessian diag(p_i) − p_i p_iᵀ in closed form."""

    def factor(
        self, logits: jax.Array, labels: jax.Array, likelihood: Likelihood = CATEGORICAL
    ) -> jax.Array:
        """L (B, K, K) with L Lᵀ = Λ (``likelihood.fisher_factor``; for the categorical
        diag(√p) − p √pᵀ in closed form)."""
        del labels
        return likelihood.fisher_factor(logits)

    def product(
        self,
        logits: jax.Array,
        labels: jax.Array,
        jv: jax.Array,
        likelihood: Likelihood = CATEGORICAL,
    ) -> jax.Array:
        """Λ jv (B, K) (``likelihood.fisher_product``; for the categorical without forming
        Λ)."""
        del labels
        return likelihood.fisher_product(logits, jv)


@dataclass(frozen=True)
class EmpiricalFisher:
    """The empirical Fisher: Λ_i = r_i r_iᵀ, r_i = −∂ log p(y_i | f_i)/∂f (p_i −
    onehot(y_i) for the categorical), so J_iᵀ Λ_i J_i is the outer product of the
    per-example loss gradient (``method/laplace/curvature=empirical_fisher``)."""

    def factor(
        self, logits: jax.Array, labels: jax.Array, likelihood: Likelihood = CATEGORICAL
    ) -> jax.Array:
        """L (B, K, 1) = r."""
        return likelihood.residual(logits, labels)[:, :, None]

    def product(
        self,
        logits: jax.Array,
        labels: jax.Array,
        jv: jax.Array,
        likelihood: Likelihood = CATEGORICAL,
    ) -> jax.Array:
        """Λ jv (B, K) = r (rᵀ jv)."""
        r = likelihood.residual(logits, labels)
        return r * jnp.sum(r * jv, axis=-1, keepdims=True)


LossCurvature = GGN | EmpiricalFisher


def curvature_mv(
    logits_fn: LogitsFn,
    theta: jax.Array,
    x: jax.Array,
    y: jax.Array,
    weights: jax.Array,
    v: jax.Array,
    kind: LossCurvature = GGN(),
    likelihood: Likelihood = CATEGORICAL,
) -> jax.Array:
    """(Σ_i w_i J_iᵀ Λ_i J_i) v for one batch, by one jvp and one vjp; nothing P x P is formed.

    Args:
      logits_fn: (theta, x) -> outputs (B, K).
      theta: (P,) the linearisation point.
      x, y: a batch of inputs and (B,) targets (class labels or regression targets).
      weights: (B,) per-input weights (0 masks padding; the data-size scaling is the
        caller's).
      v: (P,) the vector.
      kind: the loss curvature, ``GGN()`` or ``EmpiricalFisher()``.
      likelihood: the likelihood p(y | f) whose loss curvature it is.

    Returns:
      (P,) the product.
    """
    logits, jvp_fn = jax.linearize(lambda t: logits_fn(t, x), theta)
    hjv = kind.product(logits, y, jvp_fn(v), likelihood)  # (B, K)
    (out,) = jax.linear_transpose(jvp_fn, theta)(hjv * weights[:, None])
    return out


def per_example_factors(
    logits_fn: LogitsFn,
    theta: jax.Array,
    x: jax.Array,
    y: jax.Array,
    weights: jax.Array,
    kind: LossCurvature = GGN(),
    likelihood: Likelihood = CATEGORICAL,
) -> jax.Array:
    """M (B, R, P) with Σ_i M_iᵀ M_i = Σ_i w_i J_iᵀ Λ_i J_i: rows √w_i (J_iᵀ L_i)ᵀ.

    R per-example vjps per input (R = K for the GGN, 1 for the empirical Fisher).
    """

    def one(xi, yi, wi):
        f = lambda t: logits_fn(t, xi[None])[0]
        logits, vjp_fn = jax.vjp(f, theta)
        L = kind.factor(logits[None], yi[None], likelihood)[0] * jnp.sqrt(wi)
        return jax.vmap(lambda col: vjp_fn(col)[0])(L.T)  # (R, P)

    return jax.vmap(one)(x, y, weights)


def diagonal_batch(
    logits_fn: LogitsFn,
    theta: jax.Array,
    x: jax.Array,
    y: jax.Array,
    weights: jax.Array,
    kind: LossCurvature = GGN(),
    likelihood: Likelihood = CATEGORICAL,
) -> jax.Array:
    """(P,) the exact diagonal of Σ_i w_i J_iᵀ Λ_i J_i for one batch (not a Hutchinson
    estimate): Σ_i Σ_r M_ir², M from ``per_example_factors``."""
    m = per_example_factors(logits_fn, theta, x, y, weights, kind, likelihood)
    return jnp.sum(jnp.square(m), axis=(0, 1))


def dense_batch(
    logits_fn: LogitsFn,
    theta: jax.Array,
    x: jax.Array,
    y: jax.Array,
    weights: jax.Array,
    kind: LossCurvature = GGN(),
    likelihood: Likelihood = CATEGORICAL,
) -> jax.Array:
    """(P, P) Σ_i w_i J_iᵀ Λ_i J_i for one batch; for the last layer or tiny networks."""
    m = per_example_factors(logits_fn, theta, x, y, weights, kind, likelihood)
    m = m.reshape(-1, m.shape[-1])
    return m.T @ m


# --------------------------------------------------------------------------- Lanczos


def lanczos(
    key: jax.Array,
    mv: Callable[[jax.Array], jax.Array],
    dim: int,
    rank: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Leading eigenpairs of a symmetric PSD operator by ``rank`` Lanczos iterations.

    Full re-orthogonalisation (classical Gram-Schmidt, twice) against all previous
    vectors keeps the basis orthonormal in float32. When the Krylov space becomes
    invariant (β ≈ 0, e.g. a GGN of rank below ``rank``) the iteration restarts from a
    random vector orthogonal to the basis, so T stays block-tridiagonal and exact.
    As laplax's ``lanczos_lowrank``, all ``rank`` Ritz pairs are returned.

    Args:
      key: for the start vector and restarts.
      mv: v (dim,) -> A v (dim,); called ``rank`` times (each call may pass over data).
      dim: P.
      rank: iterations k (≤ dim).
      progress: called with 1 after each iteration (a progress bar's ``update``).

    Returns:
      eigvals (k,) descending, clipped at 0, and eigvecs (dim, k) orthonormal columns.
    """
    rank = min(rank, dim)
    k0, key = jax.random.split(key)
    v0 = jax.random.normal(k0, (dim,), jnp.float32)
    basis = jnp.zeros((rank + 1, dim), jnp.float32).at[0].set(v0 / jnp.linalg.norm(v0))
    alpha = np.zeros(rank)
    beta = np.zeros(rank)
    for i in range(rank):
        w = mv(basis[i])
        basis, a, b = _lanczos_step(basis, w, i, jax.random.fold_in(key, i))
        alpha[i], beta[i] = float(a), float(b)
        if progress is not None:
            progress(1)
    t = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
    evals, evecs = np.linalg.eigh(t)  # ascending
    order = np.argsort(evals)[::-1].copy()
    vecs = basis[:rank].T @ jnp.asarray(evecs[:, order], jnp.float32)  # (dim, k)
    return jnp.maximum(jnp.asarray(evals[order], jnp.float32), 0.0), vecs


@jax.jit
def _lanczos_step(basis: jax.Array, w: jax.Array, i: jax.Array, key: jax.Array):
    """Orthogonalises w = A v_i against the basis; returns (basis with v_{i+1}, α_i, β_i)."""
    alpha = jnp.dot(basis[i], w)
    scale = jnp.linalg.norm(w)
    # Rows past i are still zero, so projecting on all rows projects on v_0..v_i.
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    beta = jnp.linalg.norm(w)
    # What is left of A v_i after projection is round-off: the space is invariant.
    invariant = beta <= 1e-5 * scale + 1e-30

    def restart(_):
        r = jax.random.normal(key, w.shape, w.dtype)
        for _ in range(2):
            r = r - basis.T @ (basis @ r)
        return r / jnp.linalg.norm(r), jnp.zeros((), w.dtype)

    v_next, beta = jax.lax.cond(invariant, restart, lambda _: (w / beta, beta), None)
    return basis.at[i + 1].set(v_next), alpha, beta
