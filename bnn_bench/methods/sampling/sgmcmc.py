"""``sgld``, ``psgld``, ``sghmc``: stochastic-gradient MCMC with streamed prediction.

``SGMCMC`` runs a kernel of ``sampling.kernels`` on the posterior of a
batch-norm-free network (``kernels.make_log_density``),

    log p(θ | D) ≈ log N(θ; 0, s² I) + (N / B) Σ_b log p(y_b | x_b, θ),

with ``num_chains`` chains in parallel (``vmap``), on the ``Sampler`` template (the
compiled chunked loop, the fold of every accepted sample into every evaluation set,
the replay). Minibatches are drawn on the device (uniformly with replacement, as the
BlackJAX tutorial) and preprocessed inside the step. After the burn-in, the accepted
steps (``members_per_chain`` spread evenly, or every ``thinning``-th) are members.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from bnn_bench.data import Dataset, Split
from bnn_bench.data.augment import training_batch
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.methods.base import RunContext, Work
from bnn_bench.methods.loop import Divergence
from bnn_bench.methods.sampling import schedules
from bnn_bench.methods.sampling.base import (
    Budget,
    Monitor,
    Sampler,
    SamplerCarry,
    Transition,
)
from bnn_bench.methods.sampling.kernels import Kernel, make_log_density
from bnn_bench.methods.sampling.schedules import Schedule
from bnn_bench.models import Model, Params

log = logging.getLogger(__name__)


def accepted_steps(
    num_steps: int,
    burn_in: int,
    members_per_chain: int | None = None,
    thinning: int | None = None,
    sampling_stage: np.ndarray | None = None,
) -> np.ndarray:
    """0-based indices of the steps whose sample is kept (the state after that step).

    The candidates are the K post-burn-in steps that are in a sampling stage
    (``sampling_stage``, a bool per step; all of them when None; the cyclical
    schedule's exploration stages are not). ``members_per_chain`` M spreads M samples
    evenly over the K candidates, the last one always included (candidate
    ⌊jK/M⌋ - 1, j = 1..M); ``thinning`` t keeps every t-th candidate.

    Raises:
      UserError: when the budget keeps no sample, or fewer candidates than
        ``members_per_chain`` exist; before any work.
    """
    stage = np.ones(num_steps, bool) if sampling_stage is None else np.asarray(sampling_stage)
    candidates = burn_in + np.flatnonzero(stage[burn_in:])
    k = len(candidates)
    where = f"the {num_steps - burn_in} steps after burn-in"
    if k < num_steps - burn_in:
        where += f" ({k} of them in a sampling stage; see method.step_size.exploration_fraction)"
    if k == 0:
        raise UserError(
            f"the sampling budget keeps no sample: {where} hold no sampling step. Lower "
            f"method.burn_in (or burn_in_epochs) or raise method.steps (or epochs)."
        )
    if thinning is not None:
        if thinning > k:
            raise UserError(
                f"method.thinning={thinning} keeps no sample: {where} give {k} candidate "
                f"steps. Lower method.thinning, lower method.burn_in (or burn_in_epochs), "
                f"or raise method.steps (or epochs)."
            )
        return candidates[thinning - 1 :: thinning]
    assert members_per_chain is not None
    if members_per_chain > k:
        raise UserError(
            f"method.members_per_chain={members_per_chain} exceeds {where}; lower it or run "
            f"more steps."
        )
    j = np.arange(1, members_per_chain + 1)
    return candidates[(j * k) // members_per_chain - 1]


@dataclass(frozen=True)
class SGMCMC(Sampler):
    """A stochastic-gradient MCMC sampler (``conf/method/{sgld,psgld,sghmc}.yaml``).

    Attributes:
      kernel: a ``Kernel`` from ``sampling.kernels`` (``sgld``, ``psgld``, ``sghmc``).
      step_size: a schedule from ``schedules`` (``constant``, ``polynomial``, ``cyclical``),
        or a number: a constant step size (``method.step_size=3e-6``).
      temperature: T scales the injected noise (T = 1: the Bayes posterior; T < 1 cold).
      prior_scale: s of the Gaussian prior N(0, s² I) on all parameters.
      batch_size: minibatch size B.
      steps: total steps; or set ``epochs`` (passes of N / B steps) instead.
      epochs: total steps in epochs (used when ``steps`` is null).
      burn_in: steps discarded before sampling; or ``burn_in_epochs``.
      burn_in_epochs: burn-in in epochs (used when ``burn_in`` is null).
      members_per_chain: samples per chain, evenly thinned over the post-burn-in steps.
      thinning: alternatively, keep every ``thinning``-th post-burn-in step.
      num_chains: chains run in parallel (vmap); members = chains x samples.
      save_samples: keep the samples (for ``member_log_probs`` and ``samples.msgpack``).
      chunk_size: steps per compiled ``lax.scan`` call (the progress-bar granularity).
    """

    kernel: Kernel
    step_size: Schedule | float
    temperature: float = 1.0
    prior_scale: float = 1.0
    batch_size: int = 512
    steps: int | None = None
    epochs: float | None = 20
    burn_in: int | None = None
    burn_in_epochs: float | None = 10
    members_per_chain: int | None = 100
    thinning: int | None = None
    num_chains: int = 1
    save_samples: bool = False
    chunk_size: int = 100
    loop = "sgmcmc"

    def __post_init__(self):
        if isinstance(self.step_size, int | float) and not isinstance(self.step_size, bool):
            object.__setattr__(self, "step_size", schedules.constant(self.step_size))
        if (self.members_per_chain is None) == (self.thinning is None):
            raise UserError(
                "set exactly one of method.members_per_chain and method.thinning "
                "(the other to null)."
            )
        if self.steps is None and self.epochs is None:
            raise UserError("set method.steps or method.epochs.")
        for name in (
            "batch_size",
            "num_chains",
            "chunk_size",
            "members_per_chain",
            "thinning",
            "steps",
            "epochs",
        ):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise UserError(f"method.{name} must be positive; got {v}.")
        for name in ("burn_in", "burn_in_epochs"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise UserError(f"method.{name} must be >= 0; got {v}.")
        if self.temperature < 0 or self.prior_scale <= 0:
            raise UserError("method.temperature must be >= 0 and method.prior_scale > 0.")
        if self.steps is not None and (self.burn_in is not None or self.burn_in_epochs is None):
            # a budget in steps needs no data size: refuse one that keeps no sample now
            self._schedule(self.steps, self.burn_in or 0)

    # ------------------------------------------------------------------ budget
    def budget(self, n: int) -> Budget:
        """The steps of one chain for N = n training examples.

        Raises:
          UserError: when the run is shorter than its burn-in or keeps no sample.
        """
        if self.batch_size > n:
            raise UserError(
                f"method.batch_size={self.batch_size} is larger than the training "
                f"split ({n} examples); lower it."
            )
        per_epoch = n // self.batch_size
        total = self.steps if self.steps is not None else int(round(self.epochs * per_epoch))
        if self.burn_in is not None:
            burn = self.burn_in
        elif self.burn_in_epochs is not None:
            burn = int(round(self.burn_in_epochs * per_epoch))
        else:
            burn = 0
        return Budget(total, burn, self._schedule(total, burn))

    def _schedule(self, total: int, burn: int) -> np.ndarray:
        """The accepted steps of a run of ``total`` steps with ``burn`` burn-in steps."""
        if not 0 <= burn < total:
            raise UserError(
                f"method burn-in ({burn} steps) must be >= 0 and shorter than the "
                f"run ({total} steps)."
            )
        stage = np.asarray(self.step_size.sampling_stage(np.arange(total), total))
        return accepted_steps(
            total, burn, self.members_per_chain, self.thinning, sampling_stage=stage
        )

    # ------------------------------------------------------------------- steps
    def init_states(self, model: Model, train: Split, params: Params):
        """The kernel state of every chain at ``params``."""
        del model, train
        return jax.vmap(self.kernel.init)(params)

    def transition(self, model: Model, train: Split, budget: Budget) -> Transition:
        """One kernel step of every chain on a minibatch of ``train`` drawn on the device;
        the cyclical schedule's exploration stage runs without noise."""
        grad = jax.grad(make_log_density(model, train.size, self.prior_scale))
        b, num_chains, total = self.batch_size, self.num_chains, budget.total

        def chain_step(k, state, step_size, temperature):
            k_batch, k_step = jax.random.split(k)
            idx = jax.random.randint(k_batch, (b,), 0, train.size)
            x, y = training_batch(train, idx, k_batch, model.spec.augment)
            return self.kernel.step(k_step, state, lambda p: grad(p, x, y), step_size, temperature)

        def step(key, states, t):
            keys = jax.random.split(key, num_chains)
            step_size = self.step_size(t, total)
            sampling = self.step_size.sampling_stage(t, total)
            temperature = jnp.where(sampling, self.temperature, 0.0)
            if num_chains == 1:  # plain (unbatched) matmuls are faster on CPU
                one = chain_step(
                    keys[0], jax.tree.map(lambda a: a[0], states), step_size, temperature
                )
                return jax.tree.map(lambda a: a[None], one)
            return jax.vmap(chain_step, in_axes=(0, 0, None, None))(
                keys, states, step_size, temperature
            )

        return step

    def positions(self, states):
        return states.params

    def budget_text(self, budget: Budget) -> str:
        chains, kept = self.num_chains, len(budget.accepted)
        return (
            f"{chains} chain(s) x {budget.total} steps (burn-in {budget.burn_in}), "
            f"{kept} samples per chain"
        )

    def monitor(self, model: Model, data: Dataset, budget: Budget) -> Monitor:
        """Logs the step size, the samples collected and the worst chain's NLL of a fixed
        training batch (what the divergence check bounds); reports steps per second."""
        total, burn, accepted = budget
        chains = self.num_chains
        probe = min(self.batch_size, data.train.size)  # a fixed batch: one forward per chunk
        worst_nll = chains_nll(model, data.train.x[:probe], data.train.y[:probe])

        def values(before: SamplerCarry, after: SamplerCarry, start: int, end: int):
            del before, start
            return {
                "sampler/step_size": float(self.step_size(end - 1, total)),
                "sampler/collected": float(np.sum(accepted < end) * chains),
                "sampler/train_nll": float(worst_nll(after.states.params)),
            }

        def report(carry: SamplerCarry, seconds: dict[str, float], ctx: RunContext):
            del carry, ctx
            log.info(
                "%s: burn-in %d steps in %.1fs, sampling %d steps in %.1fs; %d members",
                *(self.name, burn, seconds["burn_in"], total - burn, seconds["sampling"]),
                len(accepted) * chains,
            )
            info = {}
            for phase, steps in (("burn_in", burn), ("sampling", total - burn)):
                if steps and seconds[phase] > 0:
                    info[f"sampler/{phase}_steps_per_s"] = steps / seconds[phase]
            return info

        divergence = Divergence(
            fix=lambda values: (
                f"Lower method.step_size (now {values['sampler/step_size']:.3g}), "
                f"e.g. by 10x, or raise method.prior_scale."
            ),
            params=lambda carry: carry.states.params,
            num_classes=model.spec.num_classes,
            loss=lambda carry, values: values["sampler/train_nll"],
        )
        return Monitor(values, divergence, total * chains * self.kernel.grads_per_step, report)

    @property
    def name(self) -> str:
        return self.kernel.step.__qualname__.split(".")[0]

    def plan(self, model: Model, data: Dataset) -> Work:
        """Steps per chain, gradient evaluations, members (chains x samples), batch,
        networks (chains).

        For ``dry_run``: counts the work of ``fit`` without doing it (``data`` may
        hold shapes only); ``check`` makes the refusals."""
        total, _, accepted = self.budget(data.train.size)
        return Work(
            steps=total,
            grad_evals=total * self.num_chains * self.kernel.grads_per_step,
            members=len(accepted) * self.num_chains,
            batch_size=self.batch_size,
            networks=self.num_chains,
        )


def chains_nll(model: Model, x: jax.Array, y: jax.Array) -> Callable[[Params], jax.Array]:
    """A jitted ``params (leaves (chains, ...)) -> ()``: the largest over the chains of the
    mean NLL of ``(x (n, ...), y (n,))``, from the logits (what the divergence check
    bounds after every chunk)."""

    def nll(params: Params) -> jax.Array:
        return M.nll_of_log_probs(model.log_probs(params, {}, x), y, xp=jnp)

    return jax.jit(lambda params: jnp.max(jax.vmap(nll)(params)))
