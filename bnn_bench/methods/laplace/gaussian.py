"""Approximations of the curvature G and the Gaussian N(θ*, (G + τ I)⁻¹) on them. Pure.

A ``Curvature`` holds an approximation U diag(s) Uᵀ + diag(d) of G: a low-rank or
full eigendecomposition (``lanczos``, ``full``, ``last_layer``; d = 0) or a diagonal
(``diagonal``; U empty). With an isotropic prior N(0, τ⁻¹ I) the Laplace posterior
is N(θ*, (G + τ I)⁻¹), which is, with U orthonormal,

    Σ(τ) = U diag(1/(s+τ) − 1/τ) Uᵀ + diag(1/(d+τ)),

laplax's ``create_posterior_fn("lanczos")`` for d = 0 (the directions outside U keep
the prior variance 1/τ). Changing τ costs nothing: the posterior is re-read from
(U, s, d), which is what makes tuning τ cheap.

A ``Kronecker`` holds KFAC's eigendecomposed blocks A_l ⊗ B_l instead (``kfac.py``
computes them); it answers the same questions (``sample``, ``function_variance``,
``log_det_precision``, ``covariance``), so the predictives and the evidence take either.
The evidence log p(D | τ) and its maximiser close the module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from jax.flatten_util import ravel_pytree


class Curvature(NamedTuple):
    """A PSD approximation U diag(s) Uᵀ + diag(d) of the curvature (already scaled to the
    full data size). Either ``basis`` has no columns or ``diag`` is zero.

    Attributes:
      basis: (P, k) orthonormal eigenvectors U (k = 0 for a diagonal).
      eigvals: (k,) eigenvalues s ≥ 0.
      diag: (P,) diagonal d ≥ 0 (zeros for a low-rank or dense structure).
    """

    basis: jax.Array
    eigvals: jax.Array
    diag: jax.Array

    @property
    def dim(self) -> int:
        return self.diag.shape[0]

    @property
    def rank(self) -> int:
        """Eigenpairs held (0 for a diagonal)."""
        return self.eigvals.shape[0]

    @property
    def low_rank(self) -> bool:
        """U diag(s) Uᵀ alone (d = 0): a τ grid can reuse one pass of k tangents."""
        return not bool(jnp.any(self.diag))

    def dense(self) -> jax.Array:
        """(P, P) U diag(s) Uᵀ + diag(d); for tests."""
        return (self.basis * self.eigvals) @ self.basis.T + jnp.diag(self.diag)

    def covariance(self, prior_precision) -> jax.Array:
        """(P, P) Σ(τ) = U diag(1/(s+τ) − 1/τ) Uᵀ + diag(1/(d+τ)); dense, for tests."""
        tau = prior_precision
        w = 1.0 / (self.eigvals + tau) - 1.0 / tau
        return (self.basis * w) @ self.basis.T + jnp.diag(1.0 / (self.diag + tau))

    def sample(self, prior_precision, z: jax.Array) -> jax.Array:
        """δ = U ((1/√(s+τ) − 1/√τ) ⊙ Uᵀz) + z / √(d+τ), the symmetric square root of
        Σ(τ) applied to z (laplax's low-rank "scale"). z: (..., P) -> (..., P)."""
        tau = prior_precision
        a = jax.lax.rsqrt(self.eigvals + tau) - jax.lax.rsqrt(jnp.asarray(tau, z.dtype))
        return ((z @ self.basis) * a) @ self.basis.T + z * jax.lax.rsqrt(self.diag + tau)

    def function_variance(self, prior_precision, jac: jax.Array) -> jax.Array:
        """(..., C) Σ_k w_k (J U)_k² + Σ_j J_j² / (d_j + τ), w = 1/(s+τ) − 1/τ, for
        Jacobians jac (..., C, P)."""
        tau = prior_precision
        w = 1.0 / (self.eigvals + tau) - 1.0 / tau
        ju = jac @ self.basis  # (..., C, k)
        return jnp.sum(jnp.square(ju) * w, -1) + jnp.sum(jnp.square(jac) / (self.diag + tau), -1)

    def log_det_precision(self, prior_precision) -> jax.Array:
        """log det(G + τ I) = Σ_k log(s_k + τ) − k log τ + Σ_j log(d_j + τ)."""
        tau = prior_precision
        k = self.eigvals.shape[0]
        return (
            jnp.sum(jnp.log(self.eigvals + tau))
            - k * jnp.log(tau)
            + jnp.sum(jnp.log(self.diag + tau))
        )


def from_dense(g: jax.Array) -> Curvature:
    """A full eigendecomposition of a dense (P, P) curvature."""
    evals, evecs = jnp.linalg.eigh(0.5 * (g + g.T))
    return Curvature(evecs, jnp.maximum(evals, 0.0), jnp.zeros(g.shape[0], g.dtype))


def from_diagonal(d: jax.Array) -> Curvature:
    return Curvature(
        jnp.zeros((d.shape[0], 0), d.dtype), jnp.zeros((0,), d.dtype), jnp.maximum(d, 0.0)
    )


@dataclass(frozen=True)
class KroneckerBlock:
    """Which parameters a Kronecker block covers, in the flat vector's pytree.

    Attributes:
      path: the layer's keys in the pytree (``()`` when the pytree is the layer itself).
      params: the layer's leaves the block covers, stacked as the rows of its matrix:
        ``("kernel", "bias")`` (one joint block, the bias the last row),
        ``("kernel",)`` or ``("bias",)`` (separate weight and bias blocks).
    """

    path: tuple[str, ...]
    params: tuple[str, ...]


@struct.dataclass
class Kronecker:
    """KFAC: G ≈ blockdiag_l (A_l ⊗ B_l), one block per dense or convolution layer, or two
    (weight and bias) with ``separate_bias`` (Martens & Grosse, 2015; KFC for convolutions,
    Grosse & Martens, 2016), each factor eigendecomposed, A = Q_A diag(a) Q_Aᵀ,
    B = Q_B diag(b) Q_Bᵀ (Ritter et al., 2018).

    A block's parameters form W (D_in [+ 1 bias row], D_out) (a convolution's kernel
    (kh, kw, C_in, C_out) flattened to (kh·kw·C_in, C_out); a bias alone is (1, D_out),
    with A = 1); the block acts on it as
    W ↦ A W B, whose eigenvectors are Q_A E_ij Q_Bᵀ with eigenvalues a_i b_j. So with
    an isotropic prior every function of the posterior precision is elementwise in the
    rotated frame W' = Q_Aᵀ W Q_B:

        Σ(τ)^{1/2} w = Q_A (W' / √(a bᵀ + τ)) Q_Bᵀ,   log det(G + τI) = Σ log(a bᵀ + τ),

    and changing τ costs no refactorisation (laplace-torch's ``KronDecomposed``).

    Attributes:
      qa, a: per block, (D_in', D_in') eigenvectors and (D_in',) eigenvalues of A.
      qb, b: per block, (D_out, D_out) eigenvectors and (D_out,) eigenvalues of B.
      blocks: per block, the parameters it covers in the flat vector's pytree.
      unravel: flat (P,) -> the parameter pytree (every leaf in some block).
    """

    qa: tuple[jax.Array, ...]
    a: tuple[jax.Array, ...]
    qb: tuple[jax.Array, ...]
    b: tuple[jax.Array, ...]
    blocks: tuple[KroneckerBlock, ...] = struct.field(pytree_node=False)
    unravel: Callable = struct.field(pytree_node=False)

    @property
    def dim(self) -> int:
        return sum(qa.shape[0] * qb.shape[0] for qa, qb in zip(self.qa, self.qb, strict=True))

    @property
    def rank(self) -> int:
        return self.dim

    low_rank = False

    def _mats(self, v: jax.Array) -> list[jax.Array]:
        """(P,) -> per block its (D_in', D_out) matrix: the rows of its leaves, stacked."""
        flat = traverse_util.flatten_dict(self.unravel(v))
        mats = []
        for block in self.blocks:
            leaves = [flat[(*block.path, name)] for name in block.params]
            mats.append(jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in leaves], 0))
        return mats

    def _vector(self, mats: list[jax.Array]) -> jax.Array:
        """The inverse of ``_mats``."""
        flat = traverse_util.flatten_dict(self.unravel(jnp.zeros(self.dim, mats[0].dtype)))
        for block, m in zip(self.blocks, mats, strict=True):
            start = 0
            for name in block.params:
                shape = flat[(*block.path, name)].shape
                rows = math.prod(shape[:-1])  # a bias (D_out,) is one row
                flat[(*block.path, name)] = m[start : start + rows].reshape(shape)
                start += rows
        return ravel_pytree(traverse_util.unflatten_dict(flat))[0]

    def _spectral(self, v: jax.Array, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """fn(G) v for one v (P,): per block Q_A ((Q_Aᵀ W Q_B) ⊙ fn(a bᵀ)) Q_Bᵀ."""
        out = []
        for m, qa, a, qb, b in zip(self._mats(v), self.qa, self.a, self.qb, self.b, strict=True):
            out.append(qa @ ((qa.T @ m @ qb) * fn(jnp.outer(a, b))) @ qb.T)
        return self._vector(out)

    def _batched(self, v: jax.Array, fn) -> jax.Array:
        flat = v.reshape(-1, v.shape[-1])
        return jax.vmap(lambda u: self._spectral(u, fn))(flat).reshape(v.shape)

    def dense(self) -> jax.Array:
        """(P, P) the Kronecker-factored G; for tests."""
        return self._batched(jnp.eye(self.dim), lambda lam: lam)

    def covariance(self, prior_precision) -> jax.Array:
        """(P, P) Σ(τ) = (G + τI)⁻¹; dense, for tests."""
        return self._batched(jnp.eye(self.dim), lambda lam: 1.0 / (lam + prior_precision))

    def sample(self, prior_precision, z: jax.Array) -> jax.Array:
        """δ = Σ(τ)^{1/2} z (the symmetric root). z: (..., P) -> (..., P)."""
        return self._batched(z, lambda lam: jax.lax.rsqrt(lam + prior_precision))

    def function_variance(self, prior_precision, jac: jax.Array) -> jax.Array:
        """(..., C) diag(J Σ(τ) Jᵀ) = Σ_blocks Σ_ij (Q_Aᵀ J_l Q_B)²_ij / (a_i b_j + τ) for
        Jacobians jac (..., C, P)."""

        def one(j):
            total = jnp.zeros((), j.dtype)
            blocks = zip(self._mats(j), self.qa, self.a, self.qb, self.b, strict=True)
            for m, qa, a, qb, b in blocks:
                rotated = qa.T @ m @ qb
                total = total + jnp.sum(jnp.square(rotated) / (jnp.outer(a, b) + prior_precision))
            return total

        flat = jac.reshape(-1, jac.shape[-1])
        return jax.vmap(one)(flat).reshape(jac.shape[:-1])

    def log_det_precision(self, prior_precision) -> jax.Array:
        """log det(G + τ I) = Σ_l Σ_ij log(a_i b_j + τ)."""
        return sum(
            jnp.sum(jnp.log(jnp.outer(a, b) + prior_precision))
            for a, b in zip(self.a, self.b, strict=True)
        )


AnyCurvature = Curvature | Kronecker


def log_marginal_likelihood(
    curv: AnyCurvature, prior_precision, log_likelihood, theta_sq_norm
) -> jax.Array:
    """The Laplace evidence of an isotropic prior N(0, τ⁻¹ I) (MacKay, 1992; Immer et al., 2021):

        log p(D | τ) ≈ log p(D | θ*) − τ/2 ‖θ*‖² + P/2 log τ − ½ log det(G + τ I).

    (The 2π terms of prior and posterior cancel.) Differentiable in τ.

    Args:
      log_likelihood: log p(D | θ*), summed over the (scaled) training data.
      theta_sq_norm: ‖θ*‖² of the parameters the curvature is over.
    """
    tau = prior_precision
    return (
        log_likelihood
        - 0.5 * tau * theta_sq_norm
        + 0.5 * curv.dim * jnp.log(tau)
        - 0.5 * curv.log_det_precision(tau)
    )


def maximise_marginal_likelihood(
    curv: AnyCurvature, log_likelihood, theta_sq_norm, low: float, high: float, num: int = 1001
) -> tuple[float, float]:
    """τ maximising ``log_marginal_likelihood`` over [low, high]: a log-uniform grid of
    ``num`` points, then golden-section search between the best point's neighbours.

    Returns:
      (τ, log marginal likelihood at τ).
    """
    fn = jax.jit(
        jax.vmap(
            lambda lt: log_marginal_likelihood(curv, jnp.exp(lt), log_likelihood, theta_sq_norm)
        )
    )
    grid = np.linspace(math.log(low), math.log(high), num)
    values = np.asarray(fn(jnp.asarray(grid, jnp.float32)), np.float64)
    values = np.where(np.isfinite(values), values, -np.inf)
    best = int(np.argmax(values))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, num - 1)]
    g = (math.sqrt(5) - 1) / 2
    f1 = lambda lt: float(fn(jnp.asarray([lt], jnp.float32))[0])
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f1(c), f1(d)
    for _ in range(40):
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f1(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f1(d)
    lt, lv = (c, fc) if fc > fd else (d, fd)
    if values[best] > lv:  # the refinement may only improve on the grid
        lt, lv = grid[best], values[best]
    return float(math.exp(lt)), float(lv)
