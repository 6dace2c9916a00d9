"""The template of every sampler: ``Sampler``.

SG-MCMC and HMC run ``num_chains`` chains in parallel (``vmap``) on the posterior of a
batch-norm-free network (``kernels.make_log_density``) and fold every accepted sample of
every chain into the ``PredictiveSummary`` of every evaluation set while they sample, on
the device, so no weights need to be kept (``save_samples=true`` keeps them anyway).
``Sampler`` owns what follows from that for every sampler: ``fit`` (the chains from the
run key, through the one chunked loop of ``methods.loop``, compiled ahead of time by
``ChunkRunner``: one program for the burn-in, one for the sampling), and the replay of
the accepted samples (``predict`` hands on the folded summaries, ``member_log_probs`` gives the
kept samples' log-probabilities or runs the chains again, ``save`` writes the samples).

A subclass writes only its steps and its budget: ``budget``, ``init_states``,
``transition`` (one step of every chain), ``positions``, ``monitor`` (what each chunk
logs, the divergence check, the numbers it reports), ``budget_text`` (its budget's log
line) and ``plan``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, struct

from bnn_bench import run_folder
from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation.summary import EvalInputs, PredictiveSummary
from bnn_bench.methods.base import Method, Need, RunContext
from bnn_bench.methods.loop import Divergence, chunked_loop, chunks_of
from bnn_bench.models import Model, Params

log = logging.getLogger(__name__)

# (key, states (leaves (chains, ...)), t: () int32) -> states after step t; traced
Transition = Callable[[jax.Array, Any, jax.Array], Any]


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
    model: Model, last: Params, data: Dataset, inputs: EvalInputs
) -> dict[str, float]:
    """``test/last_sample_{acc,nll}`` (regression: ``rmse`` and ``nll``, standardised
    units): the last sample of each chain (leaves (chains, ...)) as a point estimate, for
    comparison with the posterior predictive (the BlackJAX tutorial's closing check); {}
    without a test set."""
    if "test" not in inputs.x or data.test is None:
        return {}
    log_probs = jax.jit(jax.vmap(lambda p: model.log_probs(p, {}, data.test.x)))(last)
    y, lik = data.test.y, model.likelihood
    return {
        f"test/last_sample_{lik.score_name}": float(lik.member_score(log_probs, y)),
        "test/last_sample_nll": lik.member_nll(log_probs, y),  # exact: no clipping
    }


class Budget(NamedTuple):
    """The steps of one chain.

    Attributes:
      total: all steps (HMC: transitions), burn-in included.
      burn_in: the steps at the start that are discarded (HMC: the warm-up).
      accepted: (M,) the 0-based steps whose state is a sample, ascending, all >= burn_in.
    """

    total: int
    burn_in: int
    accepted: np.ndarray


class SamplerCarry(NamedTuple):
    """The sampling loop's state between chunks (what a checkpoint holds).

    Attributes:
      states: the state of every chain; leaves (num_chains, ...).
      summaries: name -> PredictiveSummary of the samples accepted so far.
      samples: with ``save_samples``, the accepted samples, leaves (M, num_chains, ...)
        (rows past the samples accepted so far are zero); else None.
    """

    states: Any
    summaries: dict[str, PredictiveSummary]
    samples: Params | None


class Monitor(NamedTuple):
    """What one run of a sampler watches and reports (``Sampler.monitor``).

    Attributes:
      values: ``(before, after, start, end) -> values``: what the loop logs after the
        chunk ``[start, end)`` that took the carry ``before`` to ``after``.
      divergence: what the loop checks after every chunk.
      grad_evals: the gradient evaluations the loop counts at its end (0: ``report``
        counts them, from the carry).
      report: ``(carry, seconds, ctx) -> info``: the sampler's own numbers at the end;
        ``seconds`` holds the wall time of the ``burn_in`` and the ``sampling`` chunks.
    """

    values: Callable[[SamplerCarry, SamplerCarry, int, int], dict[str, float]]
    divergence: Divergence
    grad_evals: int
    report: Callable[[SamplerCarry, dict[str, float], RunContext], dict[str, float]]


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
        again (what ``member_log_probs`` uses when the samples were not kept).
    """

    model: Model = struct.field(pytree_node=False)
    summaries: dict[str, PredictiveSummary]
    last: Params
    samples: Params | None
    info: dict[str, float] = struct.field(default_factory=dict)
    replay: Callable[[jax.Array], jax.Array] | None = struct.field(pytree_node=False, default=None)


class Sampler(Method):
    """A sampler that folds its members into the evaluation while it samples (module
    docstring). A subclass is a frozen dataclass with these fields among its own:

    Attributes:
      num_chains: chains run in parallel (vmap); members = chains x samples per chain.
      save_samples: keep the samples (for ``member_log_probs`` and ``samples.msgpack``).
      chunk_size: steps per compiled loop call (progress, checkpoint granularity).
      loop: the name of its chunked loop (its checkpoint folder).
    """

    needs: ClassVar = (
        Need("batch_norm", False, "its statistics are not parameters a sampler can draw"),
    )
    loop: ClassVar[str]
    num_chains: int
    save_samples: bool
    chunk_size: int

    @abc.abstractmethod
    def budget(self, n: int) -> Budget:
        """The steps of one chain on N = n training examples.

        Raises:
          UserError: when the run keeps no sample; before any work.
        """

    @abc.abstractmethod
    def init_states(self, model: Model, train: Split, params: Params) -> Any:
        """The state of every chain at ``params`` (leaves (chains, ...))."""

    @abc.abstractmethod
    def transition(self, model: Model, train: Split, budget: Budget) -> Transition:
        """One step of every chain on ``train`` (traced: called inside the compiled loop).
        Every key of the step derives from its key, so a run does not depend on how it
        is chunked."""

    @abc.abstractmethod
    def positions(self, states: Any) -> Params:
        """The parameters of every chain in ``states``; leaves (chains, ...)."""

    def accepts(self, t: jax.Array, i: jax.Array, accept, slot) -> tuple[jax.Array, jax.Array]:
        """Whether the state after step t (step i of its chunk) is a sample, and its row of
        ``samples`` (traced); by default the chunk's rows of the budget's mask."""
        del t
        return accept[i], slot[i]

    @abc.abstractmethod
    def monitor(self, model: Model, data: Dataset, budget: Budget) -> Monitor:
        """What a run on ``data`` watches and reports."""

    @abc.abstractmethod
    def budget_text(self, budget: Budget) -> str:
        """The run in a few words, for the log (``"2 chain(s) x 100 steps ..."``)."""

    # --------------------------------------------------------------------- fit
    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> SamplePosterior:
        """Samples ``num_chains`` chains, folding every accepted sample into the sets of
        ``ctx.inputs`` (none outside a run: then only ``member_log_probs`` gives the samples)."""
        self.check(model, data)
        ctx = ctx or RunContext()
        inputs = ctx.inputs if ctx.inputs is not None else EvalInputs({})
        carry, info = self._sample(key, model, data, inputs, ctx)
        last = self.positions(carry.states)
        info.update(last_sample_metrics(model, last, data, inputs))
        samples = None
        if carry.samples is not None:  # (M, chains, ...) -> (M * chains, ...)
            samples = jax.tree.map(lambda b: b.reshape(-1, *b.shape[2:]), carry.samples)
        replay = functools.partial(self.replay, key, model, data)
        return SamplePosterior(model, carry.summaries, last, samples, info, replay)

    def _sample(
        self, key: jax.Array, model: Model, data: Dataset, inputs: EvalInputs, ctx: RunContext
    ) -> tuple[SamplerCarry, dict[str, float]]:
        """The chains from ``key``: the final carry and the sampler's own numbers."""
        k_init, k_run = jax.random.split(key)
        budget = self.budget(data.train.size)
        chains, kept = self.num_chains, len(budget.accepted)
        params = jax.vmap(lambda k: model.init(k)[0])(jax.random.split(k_init, chains))
        width = model.likelihood.member_width(model.spec.num_classes)  # C, or 2: (μ, log σ)
        carry = SamplerCarry(
            states=self.init_states(model, data.train, params),
            summaries=inputs.empty(width, chains, kept),  # + ChainTrace
            samples=jax.tree.map(lambda p: jnp.zeros((kept, *p.shape), p.dtype), params)
            if self.save_samples
            else None,
        )
        runner = ChunkRunner(self, model, data.train, inputs.x, budget)
        runner.compile(carry)
        log.info("%s: %s; compiled in %.1fs", self.name, self.budget_text(budget), runner.compile_s)
        monitor = self.monitor(model, data, budget)
        seconds = {"burn_in": 0.0, "sampling": 0.0}

        def run(before: SamplerCarry, start: int, end: int):
            tic, phase = time.perf_counter(), "sampling" if start >= budget.burn_in else "burn_in"
            after = jax.block_until_ready(runner(before, k_run, start, end))
            seconds[phase] += time.perf_counter() - tic
            return after, monitor.values(before, after, start, end)

        grads, divergence = monitor.grad_evals, monitor.divergence
        carry = chunked_loop(
            ctx, self.loop, carry, runner.chunks, run, divergence, grads, self.name
        )
        ctx.count(samples=kept * chains)
        info = {"time/compile": runner.compile_s, **monitor.report(carry, seconds, ctx)}
        return carry, info

    def replay(self, key: jax.Array, model: Model, data: Dataset, x: jax.Array) -> jax.Array:
        """(S, N, C): every accepted sample's log-probabilities of x, from the chains that
        ``fit(key, ...)`` ran again (every key derives from (run key, step), so the same
        samples are drawn)."""
        members = len(self.budget(data.train.size).accepted) * self.num_chains
        inputs = EvalInputs({"x": x}, keep=x.shape[0], capacity=members)
        quiet = dataclasses.replace(self, save_samples=False)
        return (
            quiet._sample(key, model, data, inputs, RunContext())[0]
            .summaries["x"]
            .kept_log_members()
        )

    # ----------------------------------------------------------------- members
    def predict(
        self, key: jax.Array, posterior: SamplePosterior, inputs: EvalInputs
    ) -> dict[str, PredictiveSummary]:
        """The summaries folded while sampling (the key is unused)."""
        del key
        missing = set(inputs.x) - set(posterior.summaries)
        if missing:
            raise UserError(
                f"evaluation sets {sorted(missing)} were not known when sampling; "
                f"{type(self).__name__} folds members in while it samples."
            )
        return {name: posterior.summaries[name] for name in inputs.x}

    def member_log_probs(
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
        path = Path(out_dir) / run_folder.SAMPLES
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(serialization.msgpack_serialize(jax.device_get(posterior.samples)))
        log.info("wrote %d samples to %s", jax.tree.leaves(posterior.samples)[0].shape[0], path)
        return path


class ChunkRunner:
    """The compiled chunks of one sampling run: ``runner(carry, key, start, end) -> carry``
    runs the steps ``[start, end)`` of every chain in one ``fori_loop``.

    Two programs, each compiled once: the burn-in (folds nothing) and the sampling
    (folds every accepted step). Chunks never straddle the end of burn-in, and the trip
    count is an argument, so each phase compiles once whatever its chunks' lengths.
    Step t runs with the key ``fold_in(run key, t)``, so a run does not depend on how it
    is chunked.
    """

    def __init__(self, method: Sampler, model: Model, train: Split, inputs, budget: Budget):
        self.method, self.model, self.train, self.inputs = method, model, train, inputs
        self.budget, self.burn, size = budget, budget.burn_in, method.chunk_size
        self.chunks = chunks_of(0, self.burn, size) + chunks_of(self.burn, budget.total, size)
        mask = np.zeros(budget.total + size, bool)
        mask[budget.accepted] = True
        self.accept = mask  # accept[t]: the state after step t is a sample
        self.every_step = bool(mask[budget.burn_in : budget.total].all())  # no lax.cond then
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
        step = self.method.transition(self.model, train, self.budget)
        positions = self.method.positions
        fold = functools.partial(fold_sample, self.model, inputs)

        def body(i, carry: SamplerCarry) -> SamplerCarry:
            t = start + i
            states = step(jax.random.fold_in(key, t), carry.states, t)
            summaries, samples = carry.summaries, carry.samples
            take, row = self.method.accepts(t, i, accept, slot)
            if sampling and self.every_step:
                summaries, samples = fold(summaries, samples, positions(states), row)
            elif sampling:  # an unbatched predicate: lax.cond skips the other steps' prediction
                summaries, samples = jax.lax.cond(
                    take,
                    fold,
                    lambda s, bu, p, j: (s, bu),
                    summaries,
                    samples,
                    positions(states),
                    row,
                )
            return SamplerCarry(states, summaries, samples)

        return jax.lax.fori_loop(0, length, body, carry)
