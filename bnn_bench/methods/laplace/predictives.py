"""How members are drawn from the Laplace posterior:
``method/laplace/predictive=linearised|weights|probit``.

* ``Linearised``: Monte Carlo in function space, f(x, θ*) + J(x) δ (laplax's
  ``lin_mc_pred_act``);
* ``WeightSpace``: Monte Carlo in weight space, f(x, θ* + δ);
* ``Probit``: one member, softmax(μ / √(1 + π/8 σ²)) (MacKay, 1992); classification only.

δ = Σ(τ)^{1/2} z. A member yields ``likelihood.member`` of its outputs: class
log-probabilities (N, C), or a Gaussian's (mean, log σ) (N, 2). For the Gaussian with
fixed noise the linearised members' mixture has mean f(x, θ*) and variance
J Σ Jᵀ + σ² as S grows: the GLM predictive (Immer et al., 2021), by sampling. The jitted
forward passes that draw the members follow the classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from bnn_bench.data import Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.likelihoods import Categorical, Likelihood
from bnn_bench.methods.laplace.posterior import LaplacePosterior
from bnn_bench.models.base import map_batches

_JACOBIAN_FLOATS = 2**24  # per-example Jacobians per probit batch: (b, C, P) <= this


class Predictive:
    """Members of the Laplace posterior: ``member_log_probs`` streams what they yield."""

    members: int  # S

    def check(self, likelihood: Likelihood) -> None:
        """Refuses a likelihood this predictive has no form for (before training)."""
        del likelihood

    def member_log_probs(
        self, key: jax.Array, post: LaplacePosterior, x: jax.Array, members_per_chunk: int
    ) -> Iterator[jax.Array]:
        """Chunks (s, N, M) of ``likelihood.member`` of the members' outputs: class
        log-probabilities (M = C) or a Gaussian's (mean, log σ) (M = 2)."""
        raise NotImplementedError

    def nll_fn(
        self, key: jax.Array, post: LaplacePosterior, val: Split, members_per_chunk: int
    ) -> Callable[[float], float]:
        """τ -> validation NLL of this predictive (members drawn with ``key``): of the
        mean of the members' class probabilities, or of their Gaussian mixture."""

        head_post, x = post.with_head_inputs(val.x)  # last layer: its body once, not per τ

        def nll(tau):
            p = head_post.replace(prior_precision=jnp.asarray(tau, jnp.float32))
            chunks = self.member_log_probs(key, p, x, members_per_chunk)
            if not isinstance(post.likelihood, Categorical):
                return float(mixture_nll(jnp.concatenate(list(chunks), 0), val.y))
            probs = sum(jnp.exp(c).sum(0) for c in chunks)
            return M.nll(probs / self.members, val.y)

        return nll


@jax.jit
def mixture_nll(members: jax.Array, y: jax.Array) -> jax.Array:
    """−mean_n log (1/S Σ_s N(y_n; μ_sn, σ_sn²)), the NLL of the equal-weight Gaussian
    mixture of members (S, N, 2) = (μ, log σ) at targets y (N,)."""
    mu, log_sigma = members[..., 0], members[..., 1]
    logp = -0.5 * jnp.square((y - mu) * jnp.exp(-log_sigma)) - log_sigma
    logp = logp - 0.5 * math.log(2 * math.pi)
    return -jnp.mean(jax.nn.logsumexp(logp, axis=0) - math.log(members.shape[0]))


@dataclass(frozen=True)
class _Sampled(Predictive):
    members: int = 30

    def __post_init__(self):
        if self.members < 1:
            raise UserError(f"method.predictive.members must be >= 1; got {self.members}.")

    linearised = True

    def member_log_probs(self, key, post, x, members_per_chunk):
        """Member s uses the deviation δ_s = Σ^{1/2} z_s, z_s ~ N(0, I) from
        ``fold_in(key, s)``, whatever x is."""
        for start in range(0, self.members, members_per_chunk):
            ids = jnp.arange(start, min(start + members_per_chunk, self.members))
            yield _sampled_probs(
                post, x, key, ids, batch_size=post.model.batch_size, linearised=self.linearised
            )  # (s, N, M)


@dataclass(frozen=True)
class Linearised(_Sampled):
    """Monte Carlo in function space: members f(x, θ*) + J(x) δ (laplax's
    ``lin_mc_pred_act``).

    Attributes:
      members: S, the weight samples.
    """

    def nll_fn(self, key, post, val, members_per_chunk):
        if not post.curvature.low_rank:
            return super().nll_fn(key, post, val, members_per_chunk)
        # d = 0: one pass of k + S tangents serves every τ of a grid
        post, x = post.with_head_inputs(val.x)
        ids = jnp.arange(self.members)
        z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), post.theta.shape))(
            ids
        )  # (S, P)
        terms = _function_space_terms(post, x, z, batch_size=post.model.batch_size)
        uz = z @ post.curvature.basis  # (S, k)
        return lambda tau: float(
            _linearised_nll(
                terms,
                uz,
                post.curvature.eigvals,
                jnp.asarray(tau, jnp.float32),
                val.y,
                post.likelihood,
            )
        )


@dataclass(frozen=True)
class WeightSpace(_Sampled):
    """Monte Carlo in weight space: members are the network itself, f(x, θ* + δ).

    Attributes:
      members: S, the weight samples.
    """

    linearised = False


@dataclass(frozen=True)
class Probit(Predictive):
    """One member from the probit approximation softmax(μ / √(1 + π/8 σ²)) of the
    linearised predictive (MacKay, 1992); classification only."""

    members = 1

    def check(self, likelihood: Likelihood) -> None:
        if not isinstance(likelihood, Categorical):
            raise UserError(
                "method/laplace/predictive=probit is the probit approximation of a softmax, "
                f"for classification only; likelihood={likelihood.name} "
                "needs method/laplace/predictive=linearised (the GLM predictive, sampled) "
                "or weights."
            )

    def member_log_probs(self, key, post, x, members_per_chunk):
        del key, members_per_chunk
        c = post.model.spec.num_classes
        b = max(1, min(post.model.batch_size, _JACOBIAN_FLOATS // (c * post.theta.shape[0])))
        yield _probit_probs(post, x, batch_size=b)[None]  # (1, N, C)


@partial(jax.jit, static_argnames=("batch_size", "linearised"))
def _sampled_probs(
    post: LaplacePosterior,
    x: jax.Array,
    key: jax.Array,
    ids: jax.Array,
    batch_size: int,
    linearised: bool,
) -> jax.Array:
    """(s, N, M) what the members ``ids`` yield (``likelihood.member``)."""
    z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), post.theta.shape))(
        ids
    )  # (s, P)
    logits = sampled_logits(post, x, z, batch_size=batch_size, linearised=linearised)
    return post.likelihood.member(logits)  # leading axes kept


@partial(jax.jit, static_argnames=("batch_size", "linearised"))
def sampled_logits(
    post: LaplacePosterior,
    x: jax.Array,
    z: jax.Array,
    batch_size: int = 1000,
    linearised: bool = True,
) -> jax.Array:
    """Outputs (s, N, K) (logits, or a Gaussian's mean [and log σ]) of the members with
    deviations δ = Σ^{1/2} z.

    Args:
      post: the posterior.
      x: (N, ...) inputs (uint8 images, or float regression features).
      z: (s, P) standard normal draws.
      linearised: f(x, θ*) + J(x) δ (a sample of the function-space Gaussian
        N(f(x, θ*), J Σ Jᵀ)) if true, else f(x, θ* + δ).
    """
    deltas = post.curvature.sample(post.prior_precision, z)  # (s, P)

    def batch_fn(xb):
        if linearised:
            logits, jvp_fn = jax.linearize(lambda t: post.logits_fn(t, xb), post.theta)
            out = logits + jax.lax.map(jvp_fn, deltas)  # (s, b, C)
        else:
            out = jax.lax.map(lambda d: post.logits_fn(post.theta + d, xb), deltas)
        return jnp.swapaxes(out, 0, 1)  # (b, s, C)

    return jnp.swapaxes(map_batches(batch_fn, x, batch_size), 0, 1)  # (s, N, C)


@partial(jax.jit, static_argnames=("batch_size",))
def _function_space_terms(
    post: LaplacePosterior, x: jax.Array, z: jax.Array, batch_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """f (N, C), J U (N, C, k) and J z (N, s, C) at θ*: with d = 0 the linearised members
    are f + J U (a(τ) ⊙ Uᵀz) + J z / √τ, a(τ) = 1/√(s+τ) − 1/√τ, so a τ grid needs
    one pass of k + s tangents instead of one pass per grid point."""

    def batch_fn(xb):
        logits, jvp_fn = jax.linearize(lambda t: post.logits_fn(t, xb), post.theta)
        ju = jax.lax.map(jvp_fn, post.curvature.basis.T)  # (k, b, C)
        jz = jax.lax.map(jvp_fn, z)  # (s, b, C)
        return logits, jnp.moveaxis(ju, 0, -1), jnp.swapaxes(jz, 0, 1)

    return map_batches(batch_fn, x, batch_size)


@partial(jax.jit, static_argnames=("likelihood",))
def _linearised_nll(
    terms,
    uz: jax.Array,
    eigvals: jax.Array,
    tau: jax.Array,
    y: jax.Array,
    likelihood: Likelihood,
) -> jax.Array:
    """NLL of the linearised MC predictive at τ from ``_function_space_terms``."""
    f, ju, jz = terms
    a = jax.lax.rsqrt(eigvals + tau) - jax.lax.rsqrt(tau)  # (k,)
    logits = f[:, None] + jnp.einsum("nck,sk->nsc", ju, a * uz) + jz * jax.lax.rsqrt(tau)
    nll, _ = likelihood.mixture(jnp.swapaxes(logits, 0, 1), y)  # members (S, N, K)
    return nll


@partial(jax.jit, static_argnames=("batch_size",))
def _probit_probs(post: LaplacePosterior, x: jax.Array, batch_size: int) -> jax.Array:
    """(N, C) log softmax(μ / √(1 + π/8 σ²)), σ² = diag(J Σ Jᵀ) of the linearised logits."""

    def batch_fn(xb):
        logits = post.logits_fn(post.theta, xb)
        jac = jax.vmap(lambda xi: jax.jacrev(lambda t: post.logits_fn(t, xi[None])[0])(post.theta))(
            xb
        )  # (b, C, P)
        var = post.curvature.function_variance(post.prior_precision, jac)
        return jax.nn.log_softmax(logits * jax.lax.rsqrt(1.0 + math.pi / 8 * var), axis=-1)

    return map_batches(batch_fn, x, batch_size)
