"""Every SG-MCMC kernel samples a Gaussian: the shared statistical test (posteriors style).

Targets: a 1-D and a correlated 2-D Gaussian N(μ, Σ) with exact gradients
∇log p(θ) = -Σ⁻¹(θ - μ). At temperature T each kernel should sample N(μ, T·Σ). Many
independent chains start from the target itself (so no burn-in bias), run ``STEPS``
steps after a short warm-up of the kernel's own state (pSGLD's V, SGHMC's momentum),
and the pooled sample mean, variances and covariance are compared with μ and T·Σ.

The tolerance is Monte Carlo error, not a guess: the chains are independent, so the
spread of the per-chain estimates across chains gives each pooled estimate's standard
error directly (ESS = variance / se², reported), and a check passes within ``Z`` se.
Step sizes keep the discretisation bias (≈ ε·λ_max/2 of the variance for SGLD) well
inside that. ``python tests/methods/test_gaussian.py`` prints the table of docs/methods/sampling.md.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.methods.sampling.kernels import Kernel, psgld, sghmc, sgld

pytestmark = pytest.mark.statistical

CHAINS, WARMUP, STEPS = 512, 500, 6000
Z = 4.0  # standard errors: ~100 checks, so a correct sampler fails one with p < 1%


class Target(NamedTuple):
    name: str
    mean: np.ndarray  # (D,)
    cov: np.ndarray  # (D, D)


_RHO, _SD = 0.6, np.array([1.0, np.sqrt(0.5)])
TARGETS = {
    "1-D": Target("1-D", np.array([0.5]), np.array([[1.5]])),
    "2-D": Target(  # correlation 0.6; eigenvalues of Σ⁻¹ 0.80 and 3.88
        "2-D",
        np.array([1.0, -1.0]),
        np.outer(_SD, _SD) * np.array([[1.0, _RHO], [_RHO, 1.0]]),
    ),
}

# (kernel, step size), each with its discretisation bias on the variance well under the
# Monte Carlo error: SGLD ≈ ε λ_max / 2 = 1%; SGHMC with carried momentum (explicit Euler,
# friction near critical damping of the slow direction) ≈ ε λ_max / (2 α) = 1%; with
# resampled momentum the leapfrog trajectory moves as Langevin with h = (L ε)²/2.
# pSGLD with α = 0.9999: its V averages over 10⁴ steps, far longer than a chain takes to
# cross the target (~500 steps), so G hardly depends on the position and dropping Γ
# costs nothing. With the default α = 0.99, V follows the position, G ∝ 1/|θ - μ|, and
# the variance comes out 1.3-1.6x the target (docs/methods/sampling.md, SG-MCMC).
SAMPLERS = {
    "sgld": (sgld(), 5e-3),
    "psgld α=0.9999": (psgld(alpha=0.9999), 4e-3),
    "sghmc carried": (sghmc(num_integration_steps=1, friction=2.0, resample_momentum=False), 1e-2),
    "sghmc resampled L=5": (sghmc(num_integration_steps=5, friction=1.0), 2e-2),
    "sghmc resampled L=1": (sghmc(num_integration_steps=1, friction=1.0), 1e-1),
}
TEMPERATURES = (1.0, 0.2)


class Measured(NamedTuple):
    mean: np.ndarray  # (D,)
    cov: np.ndarray  # (D, D)
    mean_se: np.ndarray  # (D,)
    cov_se: np.ndarray  # (D, D)
    ess: float  # of the variance estimates, the smallest over dimensions


def sample(kernel: Kernel, step_size: float, target: Target, temperature: float) -> np.ndarray:
    """(CHAINS, STEPS, D) samples, chains started from N(μ, T·Σ)."""
    mean = jnp.asarray(target.mean, jnp.float32)
    prec = jnp.asarray(np.linalg.inv(target.cov), jnp.float32)
    chol = jnp.asarray(np.linalg.cholesky(temperature * target.cov), jnp.float32)

    def grad_fn(theta):
        return -prec @ (theta - mean)

    def chain(key):
        k0, k1 = jax.random.split(key)
        start = mean + chol @ jax.random.normal(k0, mean.shape)

        def body(state, k):
            state = kernel.step(k, state, grad_fn, step_size, temperature)
            return state, state.params

        keys = jax.random.split(k1, WARMUP + STEPS)
        _, path = jax.lax.scan(body, kernel.init(start), keys)
        return path[WARMUP:]

    keys = jax.random.split(jax.random.key(0), CHAINS)
    return np.asarray(jax.jit(jax.vmap(chain))(keys), np.float64)


def measure(samples: np.ndarray) -> Measured:
    """Pooled mean and covariance, each with its standard error from the chain-to-chain
    spread of the per-chain estimates (independent chains)."""
    c = samples.shape[0]
    pooled = samples.reshape(-1, samples.shape[-1]).mean(0)
    centred = samples - pooled
    per_chain_mean = samples.mean(1)  # (C, D)
    per_chain_cov = np.einsum("csi,csj->cij", centred, centred) / samples.shape[1]  # (C, D, D)
    cov = per_chain_cov.mean(0)
    cov_se = per_chain_cov.std(0, ddof=1) / np.sqrt(c)
    var = np.diag(cov)
    # a variance estimated from ESS independent Gaussian draws has se = var·√(2/ESS)
    ess = float(np.min(2 * var**2 / np.diag(cov_se) ** 2))
    return Measured(pooled, cov, per_chain_mean.std(0, ddof=1) / np.sqrt(c), cov_se, ess)


def _cases():
    return [
        pytest.param(s, t, temp, id=f"{s}-{t}-T{temp}")
        for s in SAMPLERS
        for t in TARGETS
        for temp in TEMPERATURES
    ]


@pytest.mark.slow  # ~2 s of CPU per case, 20 cases
@pytest.mark.parametrize("sampler,target_name,temperature", _cases())
def test_sampler_matches_the_gaussian_within_monte_carlo_error(sampler, target_name, temperature):
    kernel, step_size = SAMPLERS[sampler]
    target = TARGETS[target_name]
    m = measure(sample(kernel, step_size, target, temperature))
    want_cov = temperature * target.cov
    # the test must be able to see a 10% error in a variance: enough effective samples
    assert Z * np.sqrt(2 / m.ess) < 0.1, f"ESS {m.ess:.0f} too small for a sharp test"
    np.testing.assert_array_less(np.abs(m.mean - target.mean), Z * m.mean_se)
    np.testing.assert_array_less(np.abs(m.cov - want_cov), Z * m.cov_se)


def table() -> str:
    """Markdown: sampler × target × T, target against measured mean and variance."""
    rows = [
        "| sampler | target | T | mean: target | mean: measured ± se | variance: target "
        "| variance: measured ± se | ESS |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(xs, ses=None):
        if ses is None:
            return ", ".join(f"{x:.3f}" for x in xs)
        return ", ".join(f"{x:.3f} ± {s:.3f}" for x, s in zip(xs, ses, strict=True))

    for sampler, (kernel, step_size) in SAMPLERS.items():
        for target in TARGETS.values():
            for temp in TEMPERATURES:
                m = measure(sample(kernel, step_size, target, temp))
                rows.append(
                    f"| {sampler} (ε={step_size:g}) | {target.name} | {temp} "
                    f"| {fmt(target.mean)} | {fmt(m.mean, m.mean_se)} "
                    f"| {fmt(np.diag(temp * target.cov))} "
                    f"| {fmt(np.diag(m.cov), np.diag(m.cov_se))} | {m.ess:,.0f} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
