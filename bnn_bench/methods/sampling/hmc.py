"""``hmc``: full-batch Hamiltonian Monte Carlo, the reference posterior.

``HMC`` runs BlackJAX's HMC kernel (leapfrog, Metropolis correction, identity mass)
on the exact posterior of a batch-norm-free network over the whole training split,

    log p(θ | D) = log N(θ; 0, s² I) + Σ_n log p(y_n | x_n, θ)    (divided by T),

the log density of the SG-MCMC methods (``kernels.make_log_density``) with the batch
equal to all of train, so at T = 1 both target the same posterior. As Izmailov et
al. (2021, "What are Bayesian neural network posteriors really like?") it keeps the
**trajectory length** τ = L·ε fixed and tunes the step size ε in a warm-up.

Step size and trajectory: during the ``burn_in`` warm-up transitions ε is tuned
by dual averaging (Hoffman & Gelman 2014; ``blackjax.adaptation.step_size.
dual_averaging_adaptation``) towards ``target_acceptance``, on the chains' mean
acceptance probability, so all chains share one ε; each transition runs
L = min(⌈τ/ε⌉, ``max_integration_steps``) leapfrog steps, a trip count traced inside
the jitted loop (a ``while_loop``), so τ stays fixed while ε moves. After the warm-up
ε is frozen at dual averaging's averaged value, and with it L. Sharing ε keeps L
the same for every chain, so the vmapped trajectory wastes no steps. When the cap
binds after the warm-up the trajectories are shorter than τ: the run warns, and
``hmc/trajectory_length`` reports the length actually used.

Jitter (``jitter`` = j, off by default): each transition of each chain runs its L steps
with ε·(1 + j·u), u ~ U(−1, 1), L from the shared ε, so the trajectory length varies by ±j
around L·ε: a cheap guard against trajectories that return to where they started (Neal
2011, §5.4.2.2; Stan's ``stepsize_jitter``). j = 0 gives plain HMC, draw for draw.

``num_chains`` chains run in parallel (``vmap``) on the ``Sampler`` template, as SG-MCMC:
after the warm-up every ``thinning``-th transition of every chain is a member, folded into
every evaluation set (and the test set's ``ChainTrace`` for R̂ and ESS) as it is drawn.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.adaptation.step_size import DualAveragingAdaptationState, dual_averaging_adaptation
from blackjax.mcmc import hmc as bj_hmc
from jax.flatten_util import ravel_pytree

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.methods.base import RunContext, Work
from bnn_bench.methods.loop import Divergence
from bnn_bench.methods.sampling.base import Budget, Monitor, Sampler, SamplerCarry, Transition
from bnn_bench.methods.sampling.kernels import make_log_density
from bnn_bench.models import Model, Params

log = logging.getLogger(__name__)


class HMCStats(NamedTuple):
    """Running totals of a run (checkpointed with it, so a resumed run reports them whole).

    Attributes:
      leapfrog_steps: () int32, leapfrog steps per chain so far (= gradient evaluations).
      acceptance: () float32, sum over transitions of the chains' mean acceptance
        probability.
      sampling_acceptance: () float32, the same over the post-warm-up transitions only.
      divergences: () int32, divergent post-warm-up transitions (energy error > 1000),
        all chains (the warm-up's, while ε is tuned, are expected and not counted).
      trajectory: () float32, sum over the post-warm-up transitions of the chains' mean
        trajectory length L·ε (ε as used, jittered or not).
    """

    leapfrog_steps: jax.Array
    acceptance: jax.Array
    sampling_acceptance: jax.Array
    divergences: jax.Array
    trajectory: jax.Array


class HMCChains(NamedTuple):
    """Several HMC chains with one step size: the state of ``hmc_chains``.

    Attributes:
      states: BlackJAX ``HMCState`` of every chain (position, log density, its gradient);
        leaves (chains, ...).
      adaptation: the dual-averaging state of the shared step size.
      step_size: () float32, ε of the next transition.
      used_step_sizes: (chains,) float32, the ε each chain ran its last transition with
        (``step_size`` jittered; the initial ε before the first transition).
      stats: running totals (``HMCStats``).
    """

    states: bj_hmc.HMCState
    adaptation: DualAveragingAdaptationState
    step_size: jax.Array
    used_step_sizes: jax.Array
    stats: HMCStats


def integration_steps(trajectory_length: float, step_size, max_steps: int) -> jax.Array:
    """() int32 leapfrog steps L = ⌈τ/ε⌉ of a trajectory of length τ, in [1, max_steps].
    Jittable in ε."""
    steps = jnp.ceil(trajectory_length / step_size)
    return jnp.clip(jnp.nan_to_num(steps, nan=max_steps), 1, max_steps).astype(jnp.int32)


def jittered(key: jax.Array, step_size, jitter: float, chains: int) -> jax.Array:
    """(chains,) step sizes ε·(1 + j·u), u ~ U(−1, 1) independently per chain (Stan's
    ``stepsize_jitter``). Jittable."""
    u = jax.random.uniform(key, (chains,), jnp.float32, minval=-1.0, maxval=1.0)
    return (step_size * (1.0 + jitter * u)).astype(jnp.float32)


class ChainsKernel(NamedTuple):
    """``init(positions (chains, ...), step_size) -> HMCChains``;
    ``step(key, chains, t) -> HMCChains`` runs transition t (0-based) of every chain."""

    init: Any
    step: Any


def hmc_chains(
    logdensity_fn,
    trajectory_length: float,
    burn_in: int,
    target_acceptance: float = 0.8,
    max_integration_steps: int = 1000,
    jitter: float = 0.0,
) -> ChainsKernel:
    """HMC on several chains that share a step size tuned in a warm-up. Pure, jittable.

    Transition t runs ``blackjax.mcmc.hmc.build_kernel()`` (identity mass matrix) on
    every chain with its own key, ε the shared step size and L = ⌈τ/ε⌉ leapfrog steps
    (τ = ``trajectory_length``, L at most ``max_integration_steps``); with ``jitter``
    j > 0 each chain integrates its L steps with its own ε·(1 + j·u), u ~ U(−1, 1)
    drawn anew every transition (the chains' keys are those of j = 0). While
    t < ``burn_in``, dual averaging then moves log ε by the chains' mean acceptance
    probability towards ``target_acceptance``; after the last warm-up transition ε is
    its average and stays fixed. ``HMC`` runs this on a network's parameters, the
    tests on a linear model's weights: any position pytree works.

    Args:
      logdensity_fn: ``position -> ()`` the (unnormalised) log density.

    Returns:
      A ``ChainsKernel(init, step)``.
    """
    kernel = bj_hmc.build_kernel()
    da_init, da_update, _ = dual_averaging_adaptation(target_acceptance)

    if not 0 <= jitter < 1:
        raise ValueError(f"jitter must be in [0, 1); got {jitter}")

    def init(positions, step_size) -> HMCChains:
        zero_i, zero_f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
        states = jax.vmap(lambda p: bj_hmc.init(p, logdensity_fn))(positions)
        chains = jax.tree.leaves(states.position)[0].shape[0]
        return HMCChains(
            states,
            da_init(jnp.float32(step_size)),
            jnp.float32(step_size),
            jnp.full((chains,), step_size, jnp.float32),
            HMCStats(zero_i, zero_f, zero_f, zero_i, zero_f),
        )

    def step(key, chains: HMCChains, t) -> HMCChains:
        eps = chains.step_size
        steps = integration_steps(trajectory_length, eps, max_integration_steps)

        def one(k, state, eps):
            inv_mass = jnp.ones_like(ravel_pytree(state.position)[0])
            return kernel(k, state, logdensity_fn, eps, inv_mass, steps)

        num_chains = chains.used_step_sizes.shape[0]
        keys = jax.random.split(key, num_chains)
        if jitter:  # its own stream, so the chains' keys stay those of jitter = 0
            used = jittered(jax.random.fold_in(key, _JITTER_STREAM), eps, jitter, num_chains)
            states, info = jax.vmap(one)(keys, chains.states, used)
        else:
            used = jnp.broadcast_to(eps, (num_chains,))
            states, info = jax.vmap(one, (0, 0, None))(keys, chains.states, eps)
        accept = jnp.mean(info.acceptance_rate)
        warm = t < burn_in
        stats = chains.stats
        stats = HMCStats(
            stats.leapfrog_steps + steps,
            stats.acceptance + accept,
            stats.sampling_acceptance + jnp.where(warm, 0.0, accept),
            stats.divergences + jnp.where(warm, 0, jnp.sum(info.is_divergent)).astype(jnp.int32),
            stats.trajectory + jnp.where(warm, 0.0, steps * jnp.mean(used)),
        )
        tuned = da_update(chains.adaptation, accept)
        adaptation = jax.tree.map(lambda a, b: jnp.where(warm, a, b), tuned, chains.adaptation)
        log_eps = jnp.where(
            t == burn_in - 1, tuned.log_step_size_avg, tuned.log_step_size
        )  # the last warm-up transition fixes ε at its average
        eps = jnp.where(warm, jnp.exp(log_eps), eps).astype(jnp.float32)
        return HMCChains(states, adaptation, eps, used, stats)

    return ChainsKernel(init, step)


_JITTER_STREAM = 0x6A17  # folded into a transition's key for the jitter's draws


@dataclass(frozen=True)
class HMC(Sampler):
    """Full-batch HMC with a fixed trajectory length (``conf/method/hmc.yaml``).

    Attributes:
      trajectory_length: τ = L·ε, fixed; L = ⌈τ/ε⌉ leapfrog steps per transition.
      step_size: the initial ε; the warm-up tunes it (dual averaging).
      target_acceptance: the acceptance probability the warm-up aims ε at.
      max_integration_steps: the most leapfrog steps per transition (a cap on L while a
        small ε is tried in the warm-up); the run warns when it caps L after the warm-up.
      jitter: j in [0, 1): each transition of each chain uses ε·(1 + j·u), u ~ U(−1, 1),
        with L from the unjittered ε (0: off, plain HMC).
      temperature: T; the log density is divided by T (T = 1: the Bayes posterior).
      prior_scale: s of the Gaussian prior N(0, s² I) on all parameters.
      num_chains: chains run in parallel (vmap); S = num_chains x members_per_chain.
      burn_in: transitions that tune ε and are discarded.
      members_per_chain: members kept per chain after the burn-in (warm-up).
      thinning: keep every ``thinning``-th transition after the warm-up.
      save_samples: keep the samples (for ``member_log_probs`` and ``samples.msgpack``).
      chunk_size: transitions per compiled loop call (progress, checkpoint granularity).
    """

    trajectory_length: float = 1.5
    step_size: float = 1.0e-3
    target_acceptance: float = 0.8
    max_integration_steps: int = 1000
    jitter: float = 0.0
    temperature: float = 1.0
    prior_scale: float = 1.0
    num_chains: int = 4
    burn_in: int = 100
    members_per_chain: int = 100
    thinning: int = 1
    save_samples: bool = False
    chunk_size: int = 10
    name = "hmc"
    loop = "hmc"
    minibatches = False  # the whole training split, as stored: dataset.augment is refused

    def __post_init__(self):
        positive = "trajectory_length step_size max_integration_steps temperature prior_scale"
        for name in (
            *positive.split(),
            "num_chains",
            "members_per_chain",
            "thinning",
            "chunk_size",
        ):
            v = getattr(self, name)
            if not v > 0:
                raise UserError(f"method.{name} must be positive; got {v}.")
        if self.burn_in < 0:
            raise UserError(f"method.burn_in must be >= 0; got {self.burn_in}.")
        if not 0 < self.target_acceptance < 1:
            raise UserError(
                f"method.target_acceptance must be in (0, 1); got {self.target_acceptance}."
            )
        if not 0 <= self.jitter < 1:
            raise UserError(
                f"method.jitter must be in [0, 1) (0.1: the step size varies by ±10% per "
                f"transition; 0: off); got {self.jitter}."
            )

    @property
    def total(self) -> int:
        """All transitions: warm-up, then ``members_per_chain`` x ``thinning``."""
        return self.burn_in + self.members_per_chain * self.thinning

    # ------------------------------------------------------------------- steps
    def budget(self, n: int) -> Budget:
        """The transitions: the warm-up, then every ``thinning``-th one is a sample."""
        del n  # full batch: the budget does not depend on the data size
        samples = np.arange(1, self.members_per_chain + 1)
        return Budget(self.total, self.burn_in, self.burn_in + self.thinning * samples - 1)

    def chains_kernel(self, model: Model, train: Split) -> ChainsKernel:
        """``hmc_chains`` on the posterior of ``train`` (a traced argument)."""
        knobs = (self.trajectory_length, self.burn_in, self.target_acceptance)
        density = self.log_density(model, train)
        return hmc_chains(density, *knobs, self.max_integration_steps, self.jitter)

    def init_states(self, model: Model, train: Split, params: Params) -> HMCChains:
        """Every chain at ``params`` with the initial step size."""
        init = jax.jit(lambda p, train: self.chains_kernel(model, train).init(p, self.step_size))
        return init(params, train)

    def transition(self, model: Model, train: Split, budget: Budget) -> Transition:
        del budget  # transition t of every chain: ``hmc_chains``' step
        return self.chains_kernel(model, train).step

    def positions(self, states: HMCChains) -> Params:
        return states.states.position

    def accepts(self, t: jax.Array, i: jax.Array, accept, slot) -> tuple[jax.Array, jax.Array]:
        """Every ``thinning``-th transition after the warm-up, by arithmetic on t."""
        del i, accept, slot
        done = t - self.burn_in + 1  # sampling transitions so far
        return done % self.thinning == 0, done // self.thinning - 1

    def budget_text(self, budget: Budget) -> str:
        return (
            f"{self.num_chains} chain(s) x {budget.total} transitions (warm-up "
            f"{budget.burn_in}), {self.members_per_chain} samples per chain (thinning "
            f"{self.thinning}), trajectory length {self.trajectory_length:g}"
        )

    def monitor(self, model: Model, data: Dataset, budget: Budget) -> Monitor:
        """Logs ε, L, the chunk's acceptance and the samples collected; warns once the
        warm-up is over if the cap on L binds; reports the adapted ε and L, the
        acceptance, divergences and the trajectory length actually used."""
        del data
        chains, warm, sampling = self.num_chains, self.burn_in, budget.total - budget.burn_in
        checked = False  # whether the sampling ε was checked against the cap on L

        def values(before: SamplerCarry, after: SamplerCarry, start: int, end: int):
            nonlocal checked
            eps = float(after.states.step_size)
            if end >= warm and not checked:  # ε (and with it L) is fixed from here on
                self._warn_if_capped(eps)
                checked = True
            accepted = float(after.states.stats.acceptance) - float(before.states.stats.acceptance)
            return {
                "hmc/step_size": eps,
                "hmc/integration_steps": float(self._steps(eps)),
                "hmc/acceptance_rate": accepted / (end - start),
                "sampler/collected": float(max(0, end - warm) // self.thinning * chains),
            }

        def report(carry: SamplerCarry, seconds: dict[str, float], ctx: RunContext):
            stats, eps = carry.states.stats, float(carry.states.step_size)
            ctx.count(grad_evals=chains * (1 + int(stats.leapfrog_steps)))
            if not checked:  # resumed after the warm-up
                self._warn_if_capped(eps)
            warm_accept = float(stats.acceptance - stats.sampling_acceptance) / max(warm, 1)
            info = {
                "hmc/step_size": eps,
                "hmc/integration_steps": float(self._steps(eps)),
                "hmc/trajectory_length": float(stats.trajectory) / sampling,
                "hmc/acceptance_rate": float(stats.sampling_acceptance) / sampling,
                "hmc/burn_in_acceptance_rate": warm_accept if warm else float("nan"),
                "hmc/divergences": float(stats.divergences),
            }
            rates = {
                "burn_in": (warm, seconds["burn_in"]),
                "sampling": (sampling, seconds["sampling"]),
            }
            for phase, (steps, spent) in rates.items():
                if steps and spent > 0:
                    info[f"hmc/{phase}_transitions_per_s"] = steps / spent
            log.info(
                "hmc: step size %.3g, %d leapfrog steps per transition, acceptance %.3f, "
                "%d divergent; warm-up %.1fs, sampling %.1fs; %d members",
                *(eps, self._steps(eps), info["hmc/acceptance_rate"], int(stats.divergences)),
                *(seconds["burn_in"], seconds["sampling"], self.members_per_chain * chains),
            )
            return {k: v for k, v in info.items() if math.isfinite(v)}

        # a Metropolis-corrected chain rejects a loss blow-up: only its positions are checked
        divergence = Divergence(
            fix="Lower method.step_size or method.target_acceptance's complement (raise it "
            "towards 0.9), or raise method.prior_scale.",
            params=lambda carry: carry.states.states.position,
        )
        # gradient evaluations depend on the adapted ε: ``report`` counts them
        return Monitor(values, divergence, 0, report)

    def log_density(self, model: Model, train: Split):
        """``params -> ()``: the exact log posterior over all of ``train`` (``make_log_density``
        with the batch equal to the whole split), divided by T."""
        density = make_log_density(model, train.size, self.prior_scale)
        return lambda params: density(params, train.x, train.y) / self.temperature

    def _steps(self, step_size: float) -> int:
        return int(integration_steps(self.trajectory_length, step_size, self.max_integration_steps))

    def _warn_if_capped(self, step_size: float) -> None:
        """Warns when ``max_integration_steps`` caps L = ⌈τ/ε⌉ at the sampling ε, i.e. the
        trajectories are shorter than ``trajectory_length``."""
        needed = int(integration_steps(self.trajectory_length, step_size, 2**31 - 1))
        if needed > self.max_integration_steps:
            log.warning(
                "hmc: method.max_integration_steps=%d caps L: the sampling step size %.3g "
                "needs L = ⌈τ/ε⌉ = %s leapfrog steps for method.trajectory_length=%g, so "
                "trajectories are about %.3g long instead (hmc/trajectory_length). Raise "
                "method.max_integration_steps to %s, or shorten method.trajectory_length.",
                *(self.max_integration_steps, step_size, needed, self.trajectory_length),
                *(self.max_integration_steps * step_size, needed),
            )

    def plan(self, model: Model, data: Dataset) -> Work:
        """Transitions, gradient evaluations, members (chains x samples), batch (all of
        train), networks.

        For ``dry_run``. Gradient evaluations depend on the step size the warm-up
        finds; the plan counts them at the initial ``step_size`` (L = ⌈τ/ε⌉)."""
        return Work(
            steps=self.total,
            grad_evals=self.num_chains * (1 + self.total * self._steps(self.step_size)),
            members=self.members_per_chain * self.num_chains,
            batch_size=data.train.size,
            networks=self.num_chains,
        )
