"""SG-MCMC kernels: pure ``init``/``step`` pairs over parameter pytrees (blackjax style).

A factory takes the structural knobs and returns a ``Kernel(init, step)``::

    kernel = sgld()
    state = kernel.init(params)
    state = kernel.step(key, state, grad_fn, step_size, temperature)

``grad_fn(params) -> grad`` is the gradient of the stochastic log-density
estimate on the current minibatch, ``log p(θ) + (N/B) Σ_b log p(y_b | x_b, θ)``
(``make_log_density``). Kernels take the function rather than one
gradient because SGHMC evaluates it at ``num_integration_steps`` positions per
minibatch, and pSGLD's Γ correction needs its derivative. The step size and the
temperature are per-step values (a schedule gives them); the key comes first
and is never stored.

Step sizes follow BlackJAX's convention: the drift is ``ε ∇log p`` and the
noise variance ``2 ε T``, so ``ε`` is half the ε of Welling & Teh (2011) and Li
et al. (2016). With the same key, position, minibatch and step size, ``sgld``
gives the same position as ``blackjax.sgld``, and ``sghmc`` with carried momentum
integrates exactly as BlackJAX's SGHMC diffusion. ``sghmc`` with resampled
momentum departs from ``blackjax.sghmc`` on purpose (see its docstring).

A temperature of 0 turns the noise off (and pSGLD's Γ term, and SGHMC's resampled
momentum): the cyclical schedule's exploration stage runs the kernels so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bnn_bench.models import Model

Params = Any
GradFn = Callable[[Params], Params]


class Kernel(NamedTuple):
    """A sampler as two pure functions.

    Attributes:
      init: ``params -> state``.
      step: ``(key, state, grad_fn, step_size, temperature) -> state``.
      grads_per_step: gradient evaluations in one step (for cost accounting).
    """

    init: Callable[[Params], Any]
    step: Callable[[jax.Array, Any, GradFn, Any, Any], Any]
    grads_per_step: int = 1


def gaussian_noise(key: jax.Array, tree: Params) -> Params:
    """Standard normal noise shaped like ``tree``.

    Drawn for the flattened tree in one call, as ``blackjax.util.generate_gaussian_noise``,
    so that the same key gives the same noise as BlackJAX.
    """
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


# --------------------------------------------------------------------------- SGLD


class SGLDState(NamedTuple):
    """SGLD's state is the position alone."""

    params: Params


def sgld() -> Kernel:
    """Stochastic gradient Langevin dynamics (Welling & Teh, ICML 2011).

    Update, with g = ∇θ [log p(θ) + (N/B) Σ_b log p(y_b | x_b, θ)] and ξ ~ N(0, I)::

        θ ← θ + ε g + √(2 ε T) ξ

    (BlackJAX's ``overdamped_langevin``; ε is half the paper's ε.)

    >>> import jax, jax.numpy as jnp
    >>> k = sgld()
    >>> s = k.step(jax.random.key(0), k.init({"w": jnp.zeros(3)}), lambda p: p, 1e-3, 1.0)
    >>> s.params["w"].shape
    (3,)
    """

    def init(params: Params) -> SGLDState:
        return SGLDState(params)

    def step(key, state: SGLDState, grad_fn: GradFn, step_size, temperature=1.0) -> SGLDState:
        grad = grad_fn(state.params)
        noise = gaussian_noise(key, state.params)
        scale = jnp.sqrt(2.0 * temperature * step_size)
        params = jax.tree.map(
            lambda p, g, n: p + step_size * g + scale * n, state.params, grad, noise
        )
        return SGLDState(params)

    return Kernel(init, step)


# -------------------------------------------------------------------------- pSGLD


class PSGLDState(NamedTuple):
    """Position and RMSProp's running average of squared gradients (same tree)."""

    params: Params
    sq_avg: Params


def psgld(
    alpha: float = 0.99,
    eps: float = 1e-5,
    initial_sq_avg: float = 1.0,
    gamma_correction: bool = False,
) -> Kernel:
    """Preconditioned SGLD with an RMSProp preconditioner (Li et al., AAAI 2016).

    Update, with g the stochastic gradient of the log-density and ξ ~ N(0, I)::

        V ← α V + (1 - α) g ⊙ g
        G = 1 ⊘ (eps + √V)
        θ ← θ + ε (G ⊙ g + T Γ) + √(2 ε T G) ⊙ ξ

    Γ_i = ∂G_i/∂θ_i, scaled by T because the diffusion matrix at temperature T is
    T·G and Γ is linear in it (Ma et al., 2015: Γ(T G) = T Γ(G)). The practical
    variant (the paper's experiments, JaxSGMC's ``rms_prop``) drops Γ;
    ``gamma_correction=True`` includes it, with
    Γ_i = -G_i² (1 - α) g_i H_ii / √V_i and the Hessian diagonal H_ii estimated by
    Hutchinson's probe z ⊙ (H z), z Rademacher (one extra Hessian-vector product).

    Args:
      alpha: RMSProp decay of the squared-gradient average (JaxSGMC: 0.9; Li et al.: 0.99).
      eps: stabiliser λ of the preconditioner.
      initial_sq_avg: V at the start (JaxSGMC starts from ones).
      gamma_correction: include the Γ drift.

    >>> import jax, jax.numpy as jnp
    >>> k = psgld()
    >>> s = k.step(jax.random.key(0), k.init({"w": jnp.zeros(3)}), lambda p: p, 1e-3, 1.0)
    >>> float(s.sq_avg["w"][0])
    0.99
    """

    def init(params: Params) -> PSGLDState:
        return PSGLDState(params, jax.tree.map(lambda p: jnp.full_like(p, initial_sq_avg), params))

    def step(key, state: PSGLDState, grad_fn: GradFn, step_size, temperature=1.0) -> PSGLDState:
        if gamma_correction:
            key, k_probe = jax.random.split(key)
            probe = rademacher(k_probe, state.params)
            grad, hvp = jax.jvp(grad_fn, (state.params,), (probe,))
        else:
            grad = grad_fn(state.params)
        sq_avg = jax.tree.map(lambda v, g: alpha * v + (1.0 - alpha) * g * g, state.sq_avg, grad)
        precond = jax.tree.map(lambda v: 1.0 / (eps + jnp.sqrt(v)), sq_avg)
        drift = jax.tree.map(lambda c, g: c * g, precond, grad)
        if gamma_correction:
            # T · dG/dθ through V's dependence on the current gradient; H_ii ≈ z_i (H z)_i.
            drift = jax.tree.map(
                lambda d, c, g, v, z, hz: (
                    d
                    - temperature
                    * c
                    * c
                    * (1.0 - alpha)
                    * g
                    * (z * hz)
                    / jnp.maximum(jnp.sqrt(v), 1e-30)
                ),
                drift,
                precond,
                grad,
                sq_avg,
                probe,
                hvp,
            )
        noise = gaussian_noise(key, state.params)
        params = jax.tree.map(
            lambda p, d, c, n: p + step_size * d + jnp.sqrt(2.0 * temperature * step_size * c) * n,
            state.params,
            drift,
            precond,
            noise,
        )
        return PSGLDState(params, sq_avg)

    return Kernel(init, step)


def rademacher(key: jax.Array, tree: Params) -> Params:
    """±1 with equal probability, shaped like ``tree``."""
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.rademacher(key, flat.shape, flat.dtype))


# -------------------------------------------------------------------------- SGHMC


class SGHMCState(NamedTuple):
    """Position and momentum (the momentum is redrawn each step unless told otherwise)."""

    params: Params
    momentum: Params


def sghmc(
    num_integration_steps: int = 10,
    friction: float = 0.01,
    noise_estimate: float = 0.0,
    resample_momentum: bool = True,
) -> Kernel:
    """Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin, ICML 2014).

    One step runs ``num_integration_steps`` (L) steps of the SGHMC diffusion on one
    minibatch, in Ma et al. (2015)'s scaling, with ξ ~ N(0, I) fresh each integration
    step, α the friction and β the estimate of the gradient noise (B̂). A kick of
    length h is ``r ← (1 - α h) r + h g(θ) + √(h T (2α - h T β)) ξ``.

    * ``resample_momentum=False`` (Chen et al.): the momentum is carried from step to
      step, and each integration step is BlackJAX's Euler step of the diffusion
      (``diffusions.sghmc``): ``θ ← θ + ε r``, then a kick of length ε with g at the
      old θ.
    * ``resample_momentum=True`` (HMC-like, as BlackJAX): every step draws
      r ~ N(0, T·I), the momentum's stationary law at temperature T, then runs a
      leapfrog trajectory: a kick of length ε/2, then L times ``θ ← θ + ε r``
      followed by a full kick (the last one is never used, so it is skipped). The
      position moves by L ε r₀ + (L ε)²/2 g + O(ε³): a Langevin step of size
      h = (L ε)²/2, so L = 1 is SGLD with step ε²/2. (BlackJAX draws r ~ N(0, I)
      whatever T is and starts with a drift, which moves by only ε² L(L-1)/2 g: the
      stationary variance is L/(L-1) times too large, and L = 1 never sees the
      gradient.)

    Args:
      num_integration_steps: L, gradient evaluations per step (per minibatch).
      friction: α.
      noise_estimate: β; 0 as in BlackJAX.
      resample_momentum: draw r ~ N(0, T·I) at every step and integrate by leapfrog;
        False carries r over and integrates by Euler.

    >>> import jax, jax.numpy as jnp
    >>> k = sghmc(num_integration_steps=2)
    >>> s = k.step(jax.random.key(0), k.init({"w": jnp.zeros(3)}), lambda p: p, 1e-3, 1.0)
    >>> s.params["w"].shape
    (3,)
    """
    if num_integration_steps < 1:
        raise ValueError(f"num_integration_steps must be >= 1; got {num_integration_steps}")

    def init(params: Params) -> SGHMCState:
        return SGHMCState(params, jax.tree.map(jnp.zeros_like, params))

    def kick(r, grad, key, h, temperature):
        noise = gaussian_noise(key, r)
        scale = jnp.sqrt(h * temperature * (2.0 * friction - h * temperature * noise_estimate))
        return jax.tree.map(
            lambda m, g, n: (1.0 - friction * h) * m + h * g + scale * n, r, grad, noise
        )

    def drift(params, r, step_size):
        return jax.tree.map(lambda p, m: p + step_size * m, params, r)

    def step(key, state: SGHMCState, grad_fn: GradFn, step_size, temperature=1.0) -> SGHMCState:
        # The step key is split for the integration steps and, with resampling, also
        # draws the momentum, as blackjax.sgmcmc.sghmc uses its key.
        keys = jax.random.split(key, num_integration_steps)
        if resample_momentum:
            r = jax.tree.map(lambda n: jnp.sqrt(temperature) * n, gaussian_noise(key, state.params))
            lengths = jnp.full(num_integration_steps, step_size).at[0].multiply(0.5)

            def leapfrog(carry, inp):
                params, r = carry
                k, h = inp
                r = kick(r, grad_fn(params), k, h, temperature)
                return (drift(params, r, step_size), r), None

            (params, r), _ = jax.lax.scan(leapfrog, (state.params, r), (keys, lengths))
            return SGHMCState(params, r)

        def euler(carry, k):
            params, r = carry
            grad = grad_fn(params)
            return (drift(params, r, step_size), kick(r, grad, k, step_size, temperature)), None

        (params, r), _ = jax.lax.scan(euler, (state.params, state.momentum), keys)
        return SGHMCState(params, r)

    return Kernel(init, step, num_integration_steps)


def make_log_density(model: Model, data_size: int, prior_scale: float = 1.0):
    """The stochastic log-posterior ``(params, x (B, ...), y (B,)) -> ()``.

    ``-|θ|² / (2 s²) + N · mean_b log p(y_b | f(x_b; θ))``: a Gaussian prior of
    scale ``s`` on every parameter (constants dropped) plus the minibatch
    log-likelihood (the model's likelihood: ``log softmax(f)[y]`` for classification)
    scaled to the N training examples, as BlackJAX's
    ``logdensity_estimator`` and JaxSGMC's ``minibatch_potential``. HMC evaluates it
    with the batch equal to all of train.
    """
    inv_var = 1.0 / prior_scale**2

    def log_density(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        out, _ = model.apply(params, {}, x)
        loglik = model.likelihood.log_lik(out, y)  # (B,)
        log_prior = -0.5 * inv_var * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
        return log_prior + data_size * jnp.mean(loglik)

    return log_density
