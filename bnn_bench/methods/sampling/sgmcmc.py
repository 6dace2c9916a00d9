"""``sgld``, ``psgld``, ``sghmc``: stochastic-gradient MCMC with streamed prediction.

``SGMCMC`` runs a kernel of ``sgmcmc_kernels`` on the posterior of a
batch-norm-free network,

    log p(θ | D) ≈ log N(θ; 0, s² I) + (N / B) Σ_b log p(y_b | x_b, θ),

with ``num_chains`` chains in parallel (``vmap``). The loop is ``lax.scan`` over
chunks of steps; minibatches are drawn on the device (uniformly with
replacement, as the BlackJAX tutorial) and preprocessed inside the step. After
``burn_in`` steps every accepted sample of every chain is a member: it is folded
into the ``PredictiveSummary`` of every evaluation set at once, on the device,
so no weights need to be kept (``save_samples=true`` keeps them anyway, for
``members`` and for ``samples.msgpack`` in the run folder).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, struct

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.evaluation.summary import EvalPlan, PredictiveSummary
from bnn_bench.methods.base import Method, Need, RunContext, Work
from bnn_bench.methods.loop import Divergence, chunked_loop, chunks_of
from bnn_bench.methods.sampling import schedules
from bnn_bench.methods.sampling.kernels import Kernel
from bnn_bench.methods.sampling.schedules import Schedule
from bnn_bench.models import Model, Params

log = logging.getLogger(__name__)


def make_log_density(model: Model, data_size: int, prior_scale: float = 1.0):
    """The stochastic log-posterior ``(params, x (B, H, W, C) uint8, y (B,)) -> ()``.

    ``-|θ|² / (2 s²) + N · mean_b log softmax(f(x_b; θ))[y_b]``: a Gaussian prior of
    scale ``s`` on every parameter (constants dropped) plus the minibatch
    log-likelihood scaled to the N training examples, as BlackJAX's
    ``logdensity_estimator`` and JaxSGMC's ``minibatch_potential``.
    """
    inv_var = 1.0 / prior_scale**2

    def log_density(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        logits, _ = model.apply(params, {}, x)
        loglik = jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)
        log_prior = -0.5 * inv_var * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
        return log_prior + data_size * jnp.mean(loglik)

    return log_density


def accepted_steps(
    num_steps: int,
    burn_in: int,
    accepted_samples: int | None = None,
    thinning: int | None = None,
    sampling_stage: np.ndarray | None = None,
) -> np.ndarray:
    """0-based indices of the steps whose sample is kept (the state after that step).

    The candidates are the K post-burn-in steps that are in a sampling stage
    (``sampling_stage``, a bool per step; all of them when None; the cyclical
    schedule's exploration stages are not). ``accepted_samples`` M spreads M samples
    evenly over the K candidates, the last one always included (candidate
    ⌊jK/M⌋ - 1, j = 1..M); ``thinning`` t keeps every t-th candidate.

    Raises:
      UserError: when the budget keeps no sample, or fewer candidates than
        ``accepted_samples`` exist; before any work.
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
            f"method.burn_in (or burn_in_epochs) or raise method.iterations (or epochs)."
        )
    if thinning is not None:
        if thinning > k:
            raise UserError(
                f"method.thinning={thinning} keeps no sample: {where} give {k} candidate "
                f"steps. Lower method.thinning, lower method.burn_in (or burn_in_epochs), "
                f"or raise method.iterations (or epochs)."
            )
        return candidates[thinning - 1 :: thinning]
    assert accepted_samples is not None
    if accepted_samples > k:
        raise UserError(
            f"method.accepted_samples={accepted_samples} exceeds {where}; lower it or run "
            f"more iterations."
        )
    j = np.arange(1, accepted_samples + 1)
    return candidates[(j * k) // accepted_samples - 1]


def fold_sample(
    model: Model,
    inputs: dict[str, jax.Array],
    summaries: dict[str, PredictiveSummary],
    samples: Params | None,
    params: Params,
    j: jax.Array,
) -> tuple[dict[str, PredictiveSummary], Params | None]:
    """Folds one sample of every chain (``params`` leaves (chains, ...)) into the summary
    of every evaluation set, and into row ``j`` of ``samples`` when they are kept.
    Jittable: a sampler calls it inside its loop."""
    for name, x in inputs.items():
        log_probs = jax.vmap(lambda p, x=x: model.log_probs(p, {}, x))(params)  # (chains, N, C)
        summaries = {**summaries, name: summaries[name].add(log_probs)}
    if samples is not None:
        samples = jax.tree.map(
            lambda buf, p: jax.lax.dynamic_update_index_in_dim(buf, p.astype(buf.dtype), j, 0),
            samples,
            params,
        )
    return summaries, samples


def last_sample_metrics(
    model: Model, last: Params, data: Dataset, plan: EvalPlan
) -> dict[str, float]:
    """``test/last_sample_{acc,nll}``: the last sample of each chain (leaves (chains, ...))
    as a point estimate, for comparison with the posterior predictive (the BlackJAX
    tutorial's closing check); {} without a test set."""
    if "test" not in plan.inputs or data.test is None:
        return {}
    log_probs = jax.jit(jax.vmap(lambda p: model.log_probs(p, {}, data.test.x)))(last)
    y = data.test.y
    return {
        "test/last_sample_acc": float(jnp.mean(log_probs.argmax(-1) == y)),
        "test/last_sample_nll": M.nll_of_log_probs(log_probs, y),  # exact: no clipping
    }


class SamplerCarry(NamedTuple):
    """The sampling loop's state between chunks (what a checkpoint holds).

    Attributes:
      states: the kernel state of every chain; leaves (num_chains, ...).
      summaries: name -> PredictiveSummary of the samples accepted so far.
      samples: with ``save_samples``, the accepted samples, leaves (M, num_chains, ...)
        (rows past the samples accepted so far are zero); else None.
    """

    states: Any
    summaries: dict[str, PredictiveSummary]
    samples: Params | None


@struct.dataclass
class SamplePosterior:
    """What a sampler leaves: the folded summaries and, optionally, the samples.

    Attributes:
      model: the network (static).
      summaries: name -> PredictiveSummary of every accepted sample of every chain.
      last: the final position of every chain; leaves (num_chains, ...).
      samples: the accepted samples (save_samples=true) with leaves (S, ...), ordered
        sample-major (sample j of chain c is row j * num_chains + c); else None.
      info: the sampler's own numbers for metrics.json (the last sample's point
        accuracy, steps per second).
      replay: ``x -> (S, N, C)`` log-probabilities of every sample, from the same chains run
        again (what ``members`` uses when the samples were not kept).
    """

    model: Model = struct.field(pytree_node=False)
    summaries: dict[str, PredictiveSummary]
    last: Params
    samples: Params | None
    info: dict[str, float] = struct.field(default_factory=dict)
    replay: Callable[[jax.Array], jax.Array] | None = struct.field(pytree_node=False, default=None)


class FoldingSampler(Method):
    """A sampler that folds its members into the evaluation while it samples (SG-MCMC,
    HMC): ``fit`` returns a ``SamplePosterior`` whose summaries ``predict`` hands on, and
    whose kept samples, or a replay of the chains, give ``members``."""

    needs: ClassVar = (
        Need("batch_norm", False, "its statistics are not parameters a sampler can draw"),
    )

    def predict(
        self, key: jax.Array, posterior: SamplePosterior, plan: EvalPlan
    ) -> dict[str, PredictiveSummary]:
        """The summaries folded while sampling (the key is unused)."""
        del key
        missing = set(plan.inputs) - set(posterior.summaries)
        if missing:
            raise UserError(
                f"evaluation sets {sorted(missing)} were not known when sampling; "
                f"{type(self).__name__} folds members in while it samples."
            )
        return {name: posterior.summaries[name] for name in plan.inputs}

    def members(
        self, key: jax.Array, posterior: SamplePosterior, x: jax.Array, chunk: int = 16
    ) -> Iterator[jax.Array]:
        """Class log-probabilities (s, N, C) of the accepted samples, ``chunk`` at a time, in
        the order of ``samples``.

        With ``save_samples=true`` they come from the kept samples. Otherwise the chains
        are run again with x as their only evaluation set (the same keys draw the same
        samples), keeping every member's probabilities of x: this costs one more run of
        the sampler and (S, N, C) memory, and needs no switch.
        """
        del key  # the samples are fixed
        if posterior.samples is None:
            log_probs = posterior.replay(x)  # (S, N, C)
            for s in range(0, log_probs.shape[0], chunk):
                yield log_probs[s : s + chunk]
            return
        model = posterior.model
        log_probs = jax.jit(jax.vmap(lambda p: model.log_probs(p, {}, x)))
        num = jax.tree.leaves(posterior.samples)[0].shape[0]
        for s in range(0, num, chunk):
            yield log_probs(jax.tree.map(lambda a, s=s: a[s : s + chunk], posterior.samples))

    def save(self, out_dir: str | Path, posterior: SamplePosterior) -> Path | None:
        """Writes the kept samples to ``out_dir/samples.msgpack`` (flax serialization)."""
        if posterior.samples is None:
            return None
        path = Path(out_dir) / "samples.msgpack"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(serialization.msgpack_serialize(jax.device_get(posterior.samples)))
        log.info("wrote %d samples to %s", jax.tree.leaves(posterior.samples)[0].shape[0], path)
        return path


@dataclass(frozen=True)
class SGMCMC(FoldingSampler):
    """A stochastic-gradient MCMC sampler (``conf/method/{sgld,psgld,sghmc}.yaml``).

    Attributes:
      kernel: a ``Kernel`` from ``sgmcmc_kernels`` (``sgld``, ``psgld``, ``sghmc``).
      step_size: a schedule from ``schedules`` (``constant``, ``polynomial``, ``cyclical``),
        or a number: a constant step size (``method.step_size=3e-6``).
      temperature: T scales the injected noise (T = 1: the Bayes posterior; T < 1 cold).
      prior_scale: s of the Gaussian prior N(0, s² I) on all parameters.
      batch_size: minibatch size B.
      iterations: total steps; or set ``epochs`` (passes of N / B steps) instead.
      epochs: total steps in epochs (used when ``iterations`` is null).
      burn_in: steps discarded before sampling; or ``burn_in_epochs``.
      burn_in_epochs: burn-in in epochs (used when ``burn_in`` is null).
      accepted_samples: samples per chain, evenly thinned over the post-burn-in steps.
      thinning: alternatively, keep every ``thinning``-th post-burn-in step.
      num_chains: chains run in parallel (vmap); members = chains x samples.
      save_samples: keep the samples (for ``members`` and ``samples.msgpack``).
      chunk_size: steps per compiled ``lax.scan`` call (the progress-bar granularity).
    """

    kernel: Kernel
    step_size: Schedule | float
    temperature: float = 1.0
    prior_scale: float = 1.0
    batch_size: int = 512
    iterations: int | None = None
    epochs: float | None = 20
    burn_in: int | None = None
    burn_in_epochs: float | None = 10
    accepted_samples: int | None = 100
    thinning: int | None = None
    num_chains: int = 1
    save_samples: bool = False
    chunk_size: int = 100

    def __post_init__(self):
        if isinstance(self.step_size, int | float) and not isinstance(self.step_size, bool):
            object.__setattr__(self, "step_size", schedules.constant(self.step_size))
        if (self.accepted_samples is None) == (self.thinning is None):
            raise UserError(
                "set exactly one of method.accepted_samples and method.thinning "
                "(the other to null)."
            )
        if self.iterations is None and self.epochs is None:
            raise UserError("set method.iterations or method.epochs.")
        for name in (
            "batch_size",
            "num_chains",
            "chunk_size",
            "accepted_samples",
            "thinning",
            "iterations",
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
        if self.iterations is not None and (
            self.burn_in is not None or self.burn_in_epochs is None
        ):
            # a budget in steps needs no data size: refuse one that keeps no sample now
            self._schedule(self.iterations, self.burn_in or 0)

    # ------------------------------------------------------------------ budget
    def budget(self, n: int) -> tuple[int, int, np.ndarray]:
        """(num_steps, burn_in, accepted step indices) for N = n training examples.

        Raises:
          UserError: when the run is shorter than its burn-in or keeps no sample.
        """
        if self.batch_size > n:
            raise UserError(
                f"method.batch_size={self.batch_size} is larger than the training "
                f"split ({n} examples); lower it."
            )
        per_epoch = n // self.batch_size
        total = (
            self.iterations if self.iterations is not None else int(round(self.epochs * per_epoch))
        )
        if self.burn_in is not None:
            burn = self.burn_in
        elif self.burn_in_epochs is not None:
            burn = int(round(self.burn_in_epochs * per_epoch))
        else:
            burn = 0
        return total, burn, self._schedule(total, burn)

    def _schedule(self, total: int, burn: int) -> np.ndarray:
        """The accepted steps of a run of ``total`` steps with ``burn`` burn-in steps."""
        if not 0 <= burn < total:
            raise UserError(
                f"method burn-in ({burn} steps) must be >= 0 and shorter than the "
                f"run ({total} steps)."
            )
        stage = np.asarray(self.step_size.sampling_stage(np.arange(total), total))
        return accepted_steps(
            total, burn, self.accepted_samples, self.thinning, sampling_stage=stage
        )

    # --------------------------------------------------------------------- fit
    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> SamplePosterior:
        """Samples ``num_chains`` chains, folding every accepted sample into the sets of
        ``ctx.plan`` (none outside a run: then only ``members`` gives the samples)."""
        self.check(model, data)
        ctx = ctx or RunContext()
        plan = ctx.plan if ctx.plan is not None else EvalPlan({})
        carry, info = self._sample(key, model, data, plan, ctx)
        last = carry.states.params
        info.update(last_sample_metrics(model, last, data, plan))
        samples = None
        if carry.samples is not None:  # (M, chains, ...) -> (M * chains, ...)
            samples = jax.tree.map(lambda b: b.reshape(-1, *b.shape[2:]), carry.samples)
        replay = functools.partial(self._replay, key, model, data)
        return SamplePosterior(model, carry.summaries, last, samples, info, replay)

    def _sample(
        self, key: jax.Array, model: Model, data: Dataset, plan: EvalPlan, ctx: RunContext
    ) -> tuple[SamplerCarry, dict[str, float]]:
        """The chains from ``key``: the final carry and the sampler's timings."""
        k_init, k_run = jax.random.split(key)
        total, burn, accept_idx = self.budget(data.train.size)
        chains, kept = self.num_chains, len(accept_idx)
        params = jax.vmap(lambda k: model.init(k)[0])(jax.random.split(k_init, chains))
        carry = SamplerCarry(
            states=jax.vmap(self.kernel.init)(params),
            summaries=plan.empty(model.spec.num_classes, chains, kept),  # + ChainTrace
            samples=jax.tree.map(lambda p: jnp.zeros((kept, *p.shape), p.dtype), params)
            if self.save_samples
            else None,
        )
        runner = _ChunkRunner(self, model, data.train, plan.inputs, total, burn, accept_idx)
        runner.compile(carry)
        log.info(
            "%s: %d chain(s) x %d steps (burn-in %d), %d samples per chain; compiled in %.1fs",
            *(self.name, chains, total, burn, kept, runner.compile_s),
        )
        seconds = {"burn_in": 0.0, "sampling": 0.0}
        probe = min(self.batch_size, data.train.size)  # a fixed batch: one forward per chunk
        worst_nll = chains_nll(model, data.train.x[:probe], data.train.y[:probe])

        def run(carry: SamplerCarry, start: int, end: int):
            tic = time.perf_counter()
            carry = jax.block_until_ready(runner(carry, k_run, start, end))
            seconds["sampling" if start >= burn else "burn_in"] += time.perf_counter() - tic
            collected = float(np.sum(accept_idx < end) * chains)
            return carry, {
                "sampler/step_size": float(self.step_size(end - 1, total)),
                "sampler/collected": collected,
                "sampler/train_nll": float(worst_nll(carry.states.params)),
            }

        divergence = Divergence(
            fix=lambda values: (
                f"Lower method.step_size (now {values['sampler/step_size']:.3g}), "
                f"e.g. by 10x, or raise method.prior_scale."
            ),
            params=lambda carry: carry.states.params,
            num_classes=model.spec.num_classes,
            loss=lambda carry, values: values["sampler/train_nll"],
        )
        grads = total * chains * self.kernel.grads_per_step
        carry = chunked_loop(ctx, "sgmcmc", carry, runner.chunks, run, divergence, grads, self.name)
        kept *= chains
        ctx.count(samples=kept)
        log.info(
            "%s: burn-in %d steps in %.1fs, sampling %d steps in %.1fs; %d members",
            *(self.name, burn, seconds["burn_in"], total - burn, seconds["sampling"], kept),
        )
        info = {"time/compile": runner.compile_s}
        for phase, steps in (("burn_in", burn), ("sampling", total - burn)):
            if steps and seconds[phase] > 0:
                info[f"sampler/{phase}_steps_per_s"] = steps / seconds[phase]
        return carry, info

    def _replay(self, key: jax.Array, model: Model, data: Dataset, x: jax.Array) -> jax.Array:
        """(S, N, C): every accepted sample's log-probabilities of x, from the chains that
        ``fit(key, ...)`` ran again (every key derives from (run key, step), so the same
        samples are drawn)."""
        members = len(self.budget(data.train.size)[2]) * self.num_chains
        plan = EvalPlan({"x": x}, keep=x.shape[0], capacity=members)
        quiet = dataclasses.replace(self, save_samples=False)
        return (
            quiet._sample(key, model, data, plan, RunContext())[0].summaries["x"].kept_log_members()
        )

    @property
    def name(self) -> str:
        return self.kernel.step.__qualname__.split(".")[0]

    def plan(self, model: Model, data: Dataset) -> Work:
        """Steps per chain, gradient evaluations, members (chains x samples), batch,
        networks (chains).

        For ``dry_run``: counts the work of ``fit`` without doing it (``data`` may
        hold shapes only) and raises what ``fit`` would refuse."""
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


class _ChunkRunner:
    """The compiled chunks of one sampling run: ``runner(carry, key, start, end) -> carry``
    runs the steps ``[start, end)`` of every chain in one ``fori_loop``.

    Chunks never straddle the end of burn-in (burn-in chunks carry no prediction), and
    the trip count is an argument, so each phase compiles once whatever its chunks'
    lengths. Keys derive from (run key, step), so a run does not depend on how it is
    chunked.
    """

    def __init__(self, method: SGMCMC, model: Model, train: Split, inputs, total, burn, accept):
        self.method, self.model, self.train, self.inputs = method, model, train, inputs
        self.total, self.burn = total, burn
        self.grad = jax.grad(make_log_density(model, train.size, method.prior_scale))
        size = method.chunk_size
        self.chunks = chunks_of(0, burn, size) + chunks_of(burn, total, size)
        mask = np.zeros(total + size, bool)
        mask[accept] = True
        self.accept = mask  # accept[t]: the state after step t is a sample
        self.every_step = bool(mask[burn:total].all())  # then the fold needs no lax.cond
        self.slot = np.maximum(np.cumsum(mask) - 1, 0).astype(np.int32)  # its row
        self.compiled: dict[bool, Any] = {}
        self.compile_s = 0.0

    def compile(self, carry: SamplerCarry) -> None:
        """Compiles the burn-in and the sampling program (ahead of time, timed)."""
        tic = time.perf_counter()
        size = self.method.chunk_size
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        flags = jax.ShapeDtypeStruct((size,), jnp.bool_)
        rows = jax.ShapeDtypeStruct((size,), jnp.int32)
        for sampling in {start >= self.burn for start, _ in self.chunks}:
            fn = jax.jit(functools.partial(self._run, sampling))
            self.compiled[sampling] = fn.lower(
                carry, jax.random.key(0), scalar, scalar, flags, rows, self.train, self.inputs
            ).compile()
        self.compile_s = time.perf_counter() - tic

    def __call__(self, carry: SamplerCarry, key: jax.Array, start: int, end: int) -> SamplerCarry:
        size = self.method.chunk_size
        return self.compiled[start >= self.burn](
            carry,
            key,
            np.int32(start),
            np.int32(end - start),
            self.accept[start : start + size],
            self.slot[start : start + size],
            self.train,
            self.inputs,
        )

    def _run(self, sampling, carry, key, start, length, accept, slot, train, inputs):
        m, model, grad = self.method, self.model, self.grad
        b = m.batch_size

        def chain_step(k, state, step_size, temperature):
            k_batch, k_step = jax.random.split(k)
            idx = jax.random.randint(k_batch, (b,), 0, train.size)
            x, y = train.x[idx], train.y[idx]
            return m.kernel.step(k_step, state, lambda p: grad(p, x, y), step_size, temperature)

        fold = functools.partial(fold_sample, model, inputs)

        def body(i, carry: SamplerCarry) -> SamplerCarry:
            t = start + i
            keys = jax.random.split(jax.random.fold_in(key, t), m.num_chains)
            step_size = m.step_size(t, self.total)
            # the cyclical schedule's exploration stage runs without noise
            temperature = jnp.where(m.step_size.sampling_stage(t, self.total), m.temperature, 0.0)
            if m.num_chains == 1:  # plain (unbatched) matmuls are faster on CPU
                one = chain_step(
                    keys[0], jax.tree.map(lambda a: a[0], carry.states), step_size, temperature
                )
                states = jax.tree.map(lambda a: a[None], one)
            else:
                states = jax.vmap(chain_step, in_axes=(0, 0, None, None))(
                    keys, carry.states, step_size, temperature
                )
            summaries, samples = carry.summaries, carry.samples
            if sampling and self.every_step:
                summaries, samples = fold(summaries, samples, states.params, slot[i])
            elif sampling:  # an unbatched predicate: lax.cond skips the other steps' prediction
                summaries, samples = jax.lax.cond(
                    accept[i],
                    fold,
                    lambda s, bu, p, j: (s, bu),
                    summaries,
                    samples,
                    states.params,
                    slot[i],
                )
            return SamplerCarry(states, summaries, samples)

        return jax.lax.fori_loop(0, length, body, carry)
