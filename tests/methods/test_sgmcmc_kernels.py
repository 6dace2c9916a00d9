"""SG-MCMC kernels against BlackJAX (step for step), hand formulas, and a closed-form posterior."""

from __future__ import annotations

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blackjax.sgmcmc.gradients import grad_estimator

from bnn_bench.methods.sampling.kernels import Kernel, psgld, sghmc, sgld

pytestmark = pytest.mark.statistical

# A tiny two-layer network and the BlackJAX tutorial's log-prior and log-likelihood.
D_IN, H, C, N = 6, 5, 3, 40


def _tiny_problem(key):
    kw, kx, ky = jax.random.split(key, 3)
    k1, k2 = jax.random.split(kw)
    params = {
        "w1": jax.random.normal(k1, (D_IN, H)) * 0.5,
        "b1": jnp.zeros(H),
        "w2": jax.random.normal(k2, (H, C)) * 0.5,
        "b2": jnp.zeros(C),
    }
    x = jax.random.normal(kx, (N, D_IN))
    y = jax.nn.one_hot(jax.random.randint(ky, (N,), 0, C), C)

    def logits(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def logprior_fn(p):
        return sum(jnp.sum(jax.scipy.stats.norm.logpdf(a)) for a in jax.tree.leaves(p))

    def loglikelihood_fn(p, data):  # one example, as blackjax's estimator vmaps it
        xi, yi = data
        return jnp.sum(yi * jax.nn.log_softmax(logits(p, xi[None])[0]))

    return params, (x, y), logprior_fn, loglikelihood_fn


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sgld_matches_blackjax_step_for_step(temperature):
    params, data, logprior_fn, loglik_fn = _tiny_problem(jax.random.key(0))
    bj_grad = grad_estimator(logprior_fn, loglik_fn, 1000)
    bj = blackjax.sgld(bj_grad)
    kernel = sgld()
    ours, theirs = kernel.init(params), bj.init(params)
    bj_step = jax.jit(bj.step)
    our_step = jax.jit(lambda k, s, b, e, T: kernel.step(k, s, lambda p: bj_grad(p, b), e, T))
    for t in range(5):
        key = jax.random.key(10 + t)
        batch = tuple(a[t * 8 : (t + 1) * 8] for a in data)
        theirs = bj_step(key, theirs, batch, 1e-3, temperature)
        ours = our_step(key, ours, batch, 1e-3, temperature)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours.params, theirs
        )


@pytest.mark.parametrize("friction", [0.01, 0.5])
def test_sghmc_with_carried_momentum_matches_blackjax_diffusion_step_for_step(friction):
    # Carried momentum (Chen et al.) integrates with BlackJAX's SGHMC diffusion itself:
    # L Euler steps, keys split from the step key as blackjax.sghmc splits them.
    params, data, logprior_fn, loglik_fn = _tiny_problem(jax.random.key(1))
    bj_grad = grad_estimator(logprior_fn, loglik_fn, 1000)
    diffusion = blackjax.sgmcmc.diffusions.sghmc(alpha=friction, beta=0.0)
    kernel = sghmc(num_integration_steps=4, friction=friction, resample_momentum=False)
    ours = kernel.init(params)
    theta, r = params, jax.tree.map(jnp.zeros_like, params)
    our_step = jax.jit(lambda k, s, b: kernel.step(k, s, lambda p: bj_grad(p, b), 1e-3, 0.7))
    for t in range(3):
        key = jax.random.key(20 + t)
        batch = tuple(a[t * 8 : (t + 1) * 8] for a in data)
        for k in jax.random.split(key, 4):
            theta, r = diffusion(k, theta, r, bj_grad(theta, batch), 1e-3, 0.7)
        ours = our_step(key, ours, batch)
        for a, b in ((ours.params, theta), (ours.momentum, r)):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), a, b)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_sghmc_with_resampled_momentum_is_leapfrog_from_a_momentum_at_temperature(
    temperature,
):
    # r₀ ~ N(0, T I) from the step key; then leapfrog: a half kick, then (drift, full
    # kick) pairs; friction and noise act with each kick over its own length h.
    eps, alpha, beta, L = 1e-2, 0.5, 0.1, 3
    prec = np.array([2.0, 5.0, 0.5])
    theta0 = np.array([0.5, -1.0, 2.0])
    kernel = sghmc(num_integration_steps=L, friction=alpha, noise_estimate=beta)
    key = jax.random.key(4)
    state = kernel.step(
        key,
        kernel.init({"w": jnp.asarray(theta0, jnp.float32)}),
        lambda p: {"w": -jnp.asarray(prec, jnp.float32) * p["w"]},
        eps,
        temperature,
    )
    theta = theta0.copy()
    r = np.sqrt(temperature) * np.asarray(jax.random.normal(key, (3,)), np.float64)
    for i, k in enumerate(jax.random.split(key, L)):
        h = eps / 2 if i == 0 else eps
        xi = np.asarray(jax.random.normal(k, (3,)), np.float64)
        scale = np.sqrt(h * temperature * (2 * alpha - h * temperature * beta))
        r = (1 - alpha * h) * r + h * (-prec * theta) + scale * xi
        theta = theta + eps * r
    np.testing.assert_allclose(state.params["w"], theta, rtol=1e-5, atol=1e-6)


def test_sghmc_resampled_momentum_has_variance_temperature():
    # Zero gradient, no friction: one integration step moves θ by ε r₀, r₀ ~ N(0, T I).
    theta = {"w": jnp.zeros(200_000)}
    kernel = sghmc(num_integration_steps=1, friction=0.0, resample_momentum=True)
    zero = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    state = kernel.step(jax.random.key(0), kernel.init(theta), zero, 0.1, 0.2)
    var = float(jnp.var(state.params["w"] / 0.1))
    assert abs(var - 0.2) < 0.01, var  # sd of the estimate: 0.2·√(2/200000) = 6e-4


def test_sghmc_resampling_with_one_integration_step_samples():
    # With L = 1 and the momentum thrown away, an Euler step θ ← θ + ε r₀ never sees the
    # gradient (a random walk); the leapfrog half kick makes it Langevin with h = ε²/2.
    var_target, temperature = 0.01, 1.0
    kernel = sghmc(num_integration_steps=1, friction=1.0, resample_momentum=True)
    grad = lambda p: {"w": -p["w"] / var_target}  # noqa: E731

    def chain(key):
        def body(s, k):
            s = kernel.step(k, s, grad, 0.02, temperature)
            return s, s.params["w"]

        state = kernel.init({"w": jnp.zeros(())})
        return jax.lax.scan(body, state, jax.random.split(key, 4000))[1][1000:]

    samples = jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(1), 64))
    var = float(jnp.var(samples))
    # h λ = (0.02²/2)/0.01 = 0.02: discretisation bias ~1%; 64 x 3000 correlated samples
    assert abs(var / (temperature * var_target) - 1) < 0.08, var


def test_psgld_preconditioner_matches_its_formula():
    alpha, eps, step, temp = 0.9, 1e-3, 1e-2, 0.7
    theta = {"w": jnp.array([0.5, -1.0, 2.0])}
    grads = [np.array([1.0, -2.0, 0.5]), np.array([3.0, 0.0, -1.0])]
    kernel = psgld(alpha=alpha, eps=eps, initial_sq_avg=1.0)
    state = kernel.init(theta)
    v, p = np.ones(3), np.asarray(theta["w"], np.float64)
    for t, g in enumerate(grads):
        key = jax.random.key(t)
        state = kernel.step(
            key, state, lambda _, g=g: {"w": jnp.asarray(g, jnp.float32)}, step, temp
        )
        v = alpha * v + (1 - alpha) * g * g
        G = 1.0 / (eps + np.sqrt(v))
        xi = np.asarray(jax.random.normal(key, (3,)))
        p = p + step * G * g + np.sqrt(2 * temp * step * G) * xi
        np.testing.assert_allclose(state.sq_avg["w"], v, rtol=1e-6)
        np.testing.assert_allclose(state.params["w"], p, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_psgld_gamma_correction_matches_its_formula(temperature):
    # On a separable quadratic log-density the Hessian is diagonal, so Hutchinson's
    # estimate z ⊙ (H z) of its diagonal is exact and Γ has a closed form. At temperature
    # T the target is p^(1/T) with diffusion T·G, so the drift is G g + T Γ (Ma et al.
    # 2015: Γ(T G) = T Γ(G)).
    alpha, eps, step = 0.9, 1e-3, 1e-2
    prec = jnp.array([2.0, 5.0, 0.5])
    theta = {"w": jnp.array([0.5, -1.0, 2.0])}
    kernel = psgld(alpha=alpha, eps=eps, gamma_correction=True)
    key = jax.random.key(3)
    state = kernel.step(key, kernel.init(theta), lambda p: {"w": -prec * p["w"]}, step, temperature)
    g = -np.asarray(prec * theta["w"])
    v = alpha * 1.0 + (1 - alpha) * g * g
    G = 1.0 / (eps + np.sqrt(v))
    gamma = -(G**2) * (1 - alpha) * g * (-np.asarray(prec)) / np.sqrt(v)
    xi = np.asarray(jax.random.normal(jax.random.split(key)[0], (3,)))  # after the probe split
    expected = (
        np.asarray(theta["w"])
        + step * (G * g + temperature * gamma)
        + np.sqrt(2 * temperature * step * G) * xi
    )
    np.testing.assert_allclose(state.params["w"], expected, rtol=1e-5)
    # and Γ = dG/dθ by automatic differentiation of G(θ) = 1/(eps + sqrt(αV + (1-α)g(θ)²))
    dG = jax.vmap(
        jax.grad(lambda t, i: 1.0 / (eps + jnp.sqrt(alpha + (1 - alpha) * (prec[i] * t) ** 2))),
        in_axes=(0, 0),
    )(theta["w"], jnp.arange(3))
    np.testing.assert_allclose(gamma, dG, rtol=1e-5)


def test_zero_gradient_at_zero_temperature_is_a_fixed_point():
    theta = {"w": jnp.array([0.3, -0.2]), "b": jnp.ones(())}
    # (at T = 0 pSGLD's Γ term and SGHMC's resampled momentum vanish too: the cyclical
    # schedule's exploration stage is this)
    for kernel in (
        sgld(),
        psgld(gamma_correction=True),
        sghmc(num_integration_steps=3, resample_momentum=False),
        sghmc(num_integration_steps=3, resample_momentum=True),
    ):
        state = jax.jit(kernel.step, static_argnums=2)(
            jax.random.key(0),
            kernel.init(theta),
            lambda p: jax.tree.map(jnp.zeros_like, p),
            1e-2,
            0.0,
        )
        jax.tree.map(np.testing.assert_array_equal, state.params, theta)


# ----------------------------------------------------------------- closed form
# Bayesian linear regression, y = X w + N(0, σ²), prior w ~ N(0, s² I): the posterior is
# N(μ, Σ) with Σ = (XᵀX/σ² + I/s²)⁻¹ and μ = Σ Xᵀy/σ².
def _linear_regression(n=200, d=2, sigma=1.0, s=1.0):
    kx, kw, kn = jax.random.split(jax.random.key(42), 3)
    x = jax.random.normal(kx, (n, d)) * jnp.array([1.0, 0.6])[:d] + 0.3
    y = x @ jnp.array([0.8, -0.5])[:d] + sigma * jax.random.normal(kn, (n,))
    prec = x.T @ x / sigma**2 + jnp.eye(d) / s**2
    cov = jnp.linalg.inv(prec)
    mean = cov @ x.T @ y / sigma**2

    def grad_fn_for(idx):
        def log_density(w):
            xb, yb = x[idx], y[idx]
            loglik = -0.5 * jnp.sum((yb - xb @ w) ** 2) / sigma**2
            return -0.5 * jnp.sum(w**2) / s**2 + n / idx.shape[0] * loglik

        return jax.grad(log_density)

    return n, mean, cov, grad_fn_for


def _exact_linear_regression_grad(w):
    _, _, _, grad_fn_for = _linear_regression()
    return grad_fn_for(jnp.arange(200))(w)


def _run_chains(
    kernel, step_size, batch, chains=64, burn_in=2000, steps=4000, params_of=lambda s: s.params
):
    n, mean, cov, grad_fn_for = _linear_regression()

    def one_chain(key):
        def body(state, k):
            k_batch, k_step = jax.random.split(k)
            idx = jax.random.randint(k_batch, (batch,), 0, n) if batch < n else jnp.arange(n)
            state = kernel.step(k_step, state, grad_fn_for(idx), step_size, 1.0)
            return state, params_of(state)

        _, samples = jax.lax.scan(
            body, kernel.init(jnp.zeros(2)), jax.random.split(key, burn_in + steps)
        )
        return samples[burn_in:]

    samples = jax.jit(jax.vmap(one_chain))(jax.random.split(jax.random.key(7), chains))
    return np.asarray(samples.reshape(-1, 2), np.float64), np.asarray(mean), np.asarray(cov)


# Minibatches of 100 of the 200 points. Step sizes: ε·λ_max(Σ⁻¹) ≈ 0.02 for SGLD (pSGLD:
# ε·G·λ_max, G ≈ 0.05 here), small enough that the discretisation and gradient-noise
# biases stay inside the tolerances; the chains start at 0, ~10 posterior sd away.
@pytest.mark.parametrize(
    "name,kernel,step_size,burn_in,steps",
    [
        ("sgld", sgld(), 1e-4, 2000, 4000),
        ("psgld", psgld(alpha=0.99), 5e-3, 2000, 4000),
        # Chen et al.'s SGHMC: the momentum is carried over (friction ~ 2 sqrt(λ_min))
        (
            "sghmc",
            sghmc(num_integration_steps=5, friction=20.0, resample_momentum=False),
            1e-3,
            1000,
            2000,
        ),
    ],
)
def test_samples_match_the_exact_linear_regression_posterior(
    name, kernel, step_size, burn_in, steps
):
    samples, mean, cov = _run_chains(kernel, step_size, 100, burn_in=burn_in, steps=steps)
    std = np.sqrt(np.diag(cov))
    # mean within 0.1 posterior standard deviations; covariance entries within 15% of
    # the product of the exact standard deviations
    np.testing.assert_array_less(np.abs(samples.mean(0) - mean) / std, 0.1)
    np.testing.assert_array_less(np.abs(np.cov(samples.T) - cov) / np.outer(std, std), 0.15)


def test_sghmc_with_momentum_resampling_matches_the_posterior_where_blackjax_inflates_it():
    # BlackJAX's SGHMC redraws the momentum every step and integrates with explicit
    # Euler: the position moves by Lε r₀ + ε² L(L-1)/2 g, a Langevin step of size
    # h = (Lε)²/2 whose drift is short by (L-1)/L, so even with exact gradients and a
    # small ε its stationary variance is the posterior's × L/(L-1) (1.25 for L=5).
    # bnn-bench's leapfrog trajectory (a half kick first) moves by Lε r₀ + ε² L²/2 g.
    ours, _, cov = _run_chains(
        sghmc(num_integration_steps=5, friction=10.0), 2e-3, 200, burn_in=1000, steps=2000
    )
    bj = blackjax.sghmc(lambda p, _: _exact_linear_regression_grad(p), 5, alpha=10.0)
    theirs, _, _ = _run_chains(
        Kernel(lambda p: p, lambda k, s, g, e, T: bj.step(k, s, None, e, T)),
        2e-3,
        200,
        burn_in=1000,
        steps=2000,
        params_of=lambda s: s,
    )
    np.testing.assert_allclose(np.diag(np.cov(ours.T)) / np.diag(cov), 1.0, atol=0.06)
    np.testing.assert_allclose(np.diag(np.cov(theirs.T)) / np.diag(cov), 1.25, atol=0.06)
