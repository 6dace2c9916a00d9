"""SWAG's moments and its covariance choices: how members are drawn (Maddox et al., 2019).

With n collected iterates θ_i of the SGD phase (``swag.py``):

    θ̄ = (1/n) Σ θ_i,   Σ_diag = diag((1/n) Σ θ_i²  −  θ̄²),   D = [θ_i − θ̄_i]  (the last K),
    θ ~ N(θ̄, scale · (Σ_diag + D Dᵀ / (K − 1)))

θ̄_i is the running mean right after collecting θ_i (§3.3 of the paper and the authors'
``SWAG.collect_model``); K is the number of deviation columns kept (at most
``covariance.rank``; the authors divide by ``max_num_models`` − 1 even before that many
are collected). A draw is (the authors' ``sample_fullrank``)

    θ = θ̄ + √scale · (Σ_diag^{1/2} z₁ + D z₂ / √(K − 1)),   z₁ ~ N(0, I_P), z₂ ~ N(0, I_K).

``scale`` = ½ is the paper's SWAG, ½(Σ_diag + D Dᵀ/(K − 1)), and the authors' ``--scale=0.5``.

Early deviations are measured against the mean of few iterates: for i.i.d. iterates
E[(θ_i − θ̄_i)(θ_i − θ̄_i)ᵀ] = (1 − 1/i) Σ, so with n = K = 20 collected (the first column
is 0) the low-rank term is Σ_{i≤20}(1 − 1/i)/19 ≈ 0.86 of the covariance it estimates, and
with n = 2K ≈ 1.02 (``low_rank_fraction``).

The ``covariance`` choice (``conf/method/swag/covariance/``) picks the members:
``LowRank`` (SWAG, the formula above), ``Diagonal`` (SWAG-Diagonal, N(θ̄, scale · Σ_diag);
scale 1 is the paper's §3.2) or ``SWA`` (one member at θ̄: SWA, Izmailov et al., 2018).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bnn_bench.errors import UserError

_VAR_FLOOR = 1e-30  # Σ_diag can round below zero where θ barely moved


# --------------------------------------------------------------- moments (pure)


class SWAGState(NamedTuple):
    """The running moments of the collected iterates and the last ``rank`` deviations.

    Attributes:
      count: () int32, iterates collected (n).
      mean: (P,) θ̄, the mean of the iterates.
      sq_mean: (P,) the mean of their squares.
      deviations: (rank, P) ring buffer: row (i mod rank) holds θ_i − θ̄_i of iterate i
        (0-based); rows not yet written are zero. rank may be 0 (no deviations kept).
    """

    count: jax.Array
    mean: jax.Array
    sq_mean: jax.Array
    deviations: jax.Array


def swag_init(theta: jax.Array, rank: int) -> SWAGState:
    """An empty ``SWAGState`` for flat parameters like ``theta`` (P,).

    >>> s = swag_collect(swag_init(jnp.zeros(2), rank=2), jnp.array([1.0, 3.0]))
    >>> s = swag_collect(s, jnp.array([3.0, 5.0]))
    >>> s.mean.tolist(), s.deviations.tolist()
    ([2.0, 4.0], [[0.0, 0.0], [1.0, 1.0]])
    """
    z = jnp.zeros_like(theta)
    return SWAGState(jnp.zeros((), jnp.int32), z, z, jnp.zeros((rank, *theta.shape), theta.dtype))


def swag_collect(state: SWAGState, theta: jax.Array) -> SWAGState:
    """Folds one iterate θ (P,) into the moments and the deviation buffer. Jittable."""
    n = state.count + 1
    mean = state.mean + (theta - state.mean) / n
    sq_mean = state.sq_mean + (jnp.square(theta) - state.sq_mean) / n
    rank = state.deviations.shape[0]
    deviations = state.deviations
    if rank:
        deviations = deviations.at[state.count % rank].set(theta - mean)
    return SWAGState(n, mean, sq_mean, deviations)


def swag_diag_variance(state: SWAGState) -> jax.Array:
    """(P,) Σ_diag = E[θ²] − θ̄², floored at a tiny positive number."""
    return jnp.maximum(state.sq_mean - jnp.square(state.mean), _VAR_FLOOR)


def swag_rank(state: SWAGState) -> jax.Array:
    """() K, the deviation columns in use: min(count, rank)."""
    return jnp.minimum(state.count, state.deviations.shape[0])


def swag_sample(
    key: jax.Array, state: SWAGState, scale: float, diag_only: bool = False
) -> jax.Array:
    """One θ (P,) from N(θ̄, scale · (Σ_diag + D Dᵀ/(K − 1))), or N(θ̄, scale · Σ_diag) if
    ``diag_only``: θ̄ + √scale · (Σ_diag^{1/2} z₁ + D z₂/√(K − 1)), as the authors' code.

    Needs K ≥ 2 collected iterates unless ``diag_only``. Jittable.
    """
    k1, k2 = jax.random.split(key)
    noise = jnp.sqrt(swag_diag_variance(state)) * jax.random.normal(
        k1, state.mean.shape, state.mean.dtype
    )
    if not diag_only:
        rank = state.deviations.shape[0]
        k = swag_rank(state)
        z2 = jax.random.normal(k2, (rank,), state.mean.dtype) * (jnp.arange(rank) < k)
        noise = noise + (z2 @ state.deviations) / jnp.sqrt(k - 1.0)
    return state.mean + jnp.sqrt(scale) * noise


def swag_covariance(state: SWAGState, scale: float, diag_only: bool = False) -> jax.Array:
    """(P, P) the dense covariance ``swag_sample`` draws from (tiny models and tests):
    scale · (Σ_diag + D Dᵀ/(K − 1)), or scale · Σ_diag if ``diag_only``."""
    cov = jnp.diag(swag_diag_variance(state))
    if not diag_only:
        rank = state.deviations.shape[0]
        d = state.deviations * (jnp.arange(rank) < swag_rank(state))[:, None]  # (rank, P)
        cov = cov + (d.T @ d) / (swag_rank(state) - 1.0)
    return scale * cov


def low_rank_fraction(n: int, rank: int) -> float:
    """E[D Dᵀ/(K − 1)] / Σ for n i.i.d. iterates of covariance Σ and K = min(n, rank)
    columns: Σ_{i=n−K+1..n} (1 − 1/i) / (K − 1), since Var(θ_i − θ̄_i) = (1 − 1/i) Σ.

    >>> round(low_rank_fraction(20, 20), 3), round(low_rank_fraction(40, 20), 3)
    (0.863, 1.017)
    """
    k = min(n, rank)
    return sum(1 - 1 / i for i in range(n - k + 1, n + 1)) / (k - 1)


# --------------------------------------------------------------- covariance choices


class Covariance(abc.ABC):
    """How members are drawn from the moments (``conf/method/swag/covariance/``)."""

    @property
    def rank(self) -> int:
        """Deviation columns the SGD phase keeps (0: none needed)."""
        return 0

    @property
    def min_iterates(self) -> int:
        """Collected iterates the members need."""
        return 1

    @property
    @abc.abstractmethod
    def members(self) -> int:
        """S, the number of members (a field of the choices that draw several)."""

    @abc.abstractmethod
    def draw(self, key: jax.Array, moments: SWAGState) -> jax.Array:
        """The members' flat parameters (S, P); member s from ``fold_in(key, s)``."""


def _check_samples(members: int, scale: float) -> None:
    if members < 1:
        raise UserError(f"method.covariance.members must be >= 1; got {members}.")
    if not scale > 0:
        raise UserError(
            f"method.covariance.scale must be > 0; got {scale} (one member at the mean is "
            f"method/swag/covariance=swa)."
        )


@dataclass(frozen=True)
class LowRank(Covariance):
    """SWAG: N(θ̄, scale · (Σ_diag + D Dᵀ/(K − 1))) from the last ``rank`` deviations.

    Attributes:
      rank: K, the deviation columns kept (the last K iterates; >= 2). The SGD phase should
        collect at least 2K iterates (see the module docstring); fewer are warned about.
      members: S, the weight samples.
      scale: the factor on the covariance (√scale on the noise); ½ is the paper's SWAG.
    """

    rank: int = 20
    members: int = 30
    scale: float = 0.5

    def __post_init__(self):
        _check_samples(self.members, self.scale)
        if self.rank < 2:
            raise UserError(
                f"method.covariance.rank={self.rank}: the low-rank term D Dᵀ/(K − 1) needs "
                f"K >= 2; raise it, or choose method/swag/covariance=diagonal."
            )

    @property
    def min_iterates(self) -> int:
        return 2

    def draw(self, key: jax.Array, moments: SWAGState) -> jax.Array:
        ids = jnp.arange(self.members)
        return jax.vmap(lambda s: swag_sample(jax.random.fold_in(key, s), moments, self.scale))(ids)


@dataclass(frozen=True)
class Diagonal(Covariance):
    """SWAG-Diagonal: N(θ̄, scale · Σ_diag).

    Attributes:
      members: S, the weight samples.
      scale: the factor on the covariance; 1 is the paper's §3.2 SWAG-Diagonal, ½ (the
        default) makes it SWAG without the low-rank term.
    """

    members: int = 30
    scale: float = 0.5

    def __post_init__(self):
        _check_samples(self.members, self.scale)

    def draw(self, key: jax.Array, moments: SWAGState) -> jax.Array:
        ids = jnp.arange(self.members)
        return jax.vmap(
            lambda s: swag_sample(jax.random.fold_in(key, s), moments, self.scale, diag_only=True)
        )(ids)


@dataclass(frozen=True)
class SWA(Covariance):
    """SWA (Izmailov et al., 2018): one member at the mean θ̄."""

    @property
    def members(self) -> int:
        return 1

    def draw(self, key: jax.Array, moments: SWAGState) -> jax.Array:
        del key
        return moments.mean[None]
