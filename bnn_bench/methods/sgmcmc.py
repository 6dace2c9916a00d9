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

import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, struct
from tqdm.auto import tqdm

from bnn_bench import checkpoint
from bnn_bench.data import Dataset
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.evaluation.summary import EvalPlan, PredictiveSummary
from bnn_bench.methods.base import LogFn, no_log
from bnn_bench.methods.sgmcmc_kernels import Kernel
from bnn_bench.models import Model, Params
from bnn_bench.reporting import cost

log = logging.getLogger(__name__)

Schedule = Callable[[Any, int], Any]  # (step, num_steps) -> step size


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
    num_steps: int, burn_in: int, accepted_samples: int | None = None, thinning: int | None = None
) -> np.ndarray:
    """0-based indices of the steps whose sample is kept (the state after that step).

    ``accepted_samples`` M spreads M samples evenly over the K = num_steps - burn_in
    post-burn-in steps, the last step always included (step burn_in + ⌊jK/M⌋ - 1,
    j = 1..M); ``thinning`` t keeps every t-th post-burn-in step.
    """
    k = num_steps - burn_in
    if thinning is not None:
        return burn_in + np.arange(thinning - 1, k, thinning)
    assert accepted_samples is not None
    if accepted_samples > k:
        raise UserError(
            f"method.accepted_samples={accepted_samples} exceeds the {k} steps after "
            f"burn-in; lower it or run more iterations."
        )
    j = np.arange(1, accepted_samples + 1)
    return burn_in + (j * k) // accepted_samples - 1


@struct.dataclass
class SamplePosterior:
    """What a sampler leaves: the folded summaries and, optionally, the samples.

    Attributes:
      model: the network (static).
      summaries: name -> PredictiveSummary of every accepted sample of every chain.
      last: the final position of every chain; leaves (num_chains, ...).
      samples: the accepted samples (save_samples=true) with leaves (S, ...), ordered
        sample-major (sample j of chain c is row j * num_chains + c); else None.
      metrics: extra numbers for metrics.json (the last sample's point accuracy, rates).
    """

    model: Model = struct.field(pytree_node=False)
    summaries: dict[str, PredictiveSummary]
    last: Params
    samples: Params | None
    metrics: dict[str, Any]

    def extra_metrics(self) -> dict[str, float]:
        """The sampler's own numbers for metrics.json."""
        return {k: float(v) for k, v in self.metrics.items()}


@dataclass(frozen=True)
class SGMCMC:
    """A stochastic-gradient MCMC sampler (``conf/method/{sgld,psgld,sghmc}.yaml``).

    Attributes:
      kernel: a ``Kernel`` from ``sgmcmc_kernels`` (``sgld``, ``psgld``, ``sghmc``).
      step_size: a schedule from ``schedules`` (``constant``, ``polynomial``, ``cyclical``).
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
    step_size: Schedule
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
        if self.temperature < 0 or self.prior_scale <= 0:
            raise UserError("method.temperature must be >= 0 and method.prior_scale > 0.")

    # ------------------------------------------------------------------ budget
    def budget(self, n: int) -> tuple[int, int, np.ndarray]:
        """(num_steps, burn_in, accepted step indices) for N = n training examples."""
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
        if not 0 <= burn < total:
            raise UserError(
                f"method burn-in ({burn} steps) must be >= 0 and shorter than the "
                f"run ({total} steps)."
            )
        return total, burn, accepted_steps(total, burn, self.accepted_samples, self.thinning)

    # --------------------------------------------------------------------- fit
    def fit(
        self, key: jax.Array, model: Model, data: Dataset, plan: EvalPlan, log_fn: LogFn = no_log
    ) -> SamplePosterior:
        """Samples ``num_chains`` chains, folding every accepted sample into ``plan``'s sets."""
        if model.has_batch_norm:
            raise UserError(
                f"SG-MCMC needs a model without batch norm, but model {model.name or ''} has "
                f"batch_stats. Choose one without: model.use_bn=false (mobilenet), "
                f"model.norm=none (lenet), or model=mlp/cnn."
            )
        k_init, k_run = jax.random.split(key)
        train = data.train
        n = train.size
        total, burn, accept_idx = self.budget(n)
        chains = self.num_chains
        num_samples = len(accept_idx) * chains
        mask = np.zeros(total, bool)
        mask[accept_idx] = True
        slot = np.maximum(np.cumsum(mask) - 1, 0).astype(np.int32)  # row of each accepted step

        params = jax.vmap(lambda k: model.init(k)[0])(jax.random.split(k_init, chains))
        states = jax.vmap(self.kernel.init)(params)
        summaries = plan.empty(model.spec.num_classes, chains, len(accept_idx))  # + ChainTrace
        buffer = (
            jax.tree.map(lambda p: jnp.zeros((len(accept_idx), *p.shape), p.dtype), params)
            if self.save_samples
            else None
        )
        carry = (states, summaries, buffer, jnp.asarray(-1, jnp.int32))
        runner = _ChunkRunner(self, model, n, total)

        # Chunks never straddle the end of burn-in: burn-in chunks carry no prediction. All
        # chunks of a phase have one length (the last is padded with inactive steps), so
        # each phase compiles once.
        chunks = []  # (start, end, length, sampling)
        for lo, hi, sampling in ((0, burn, False), (burn, total, True)):
            length = min(self.chunk_size, hi - lo)
            chunks += [(s, min(s + length, hi), length, sampling) for s in range(lo, hi, length)]
        tic = time.perf_counter()
        compiled = {}
        for *_, length, sampling in chunks:
            if (length, sampling) not in compiled:
                compiled[length, sampling] = runner.compile(
                    length, sampling, carry, train, plan.inputs
                )
        compile_s = time.perf_counter() - tic
        log.info(
            "%s: %d chain(s) x %d steps (burn-in %d), %d samples per chain; compiled in %.1fs",
            self.name,
            chains,
            total,
            burn,
            len(accept_idx),
            compile_s,
        )
        pad = max(length for *_, length, _ in chunks)
        mask, slot = np.pad(mask, (0, pad)), np.pad(slot, (0, pad))

        ckpt = checkpoint.loop("sgmcmc")  # the carry holds states, summaries, samples
        done, carry = ckpt.restore(carry) or (0, carry)
        bar = tqdm(
            total=total,
            initial=done,
            desc=self.name,
            unit="step",
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
            dynamic_ncols=True,
        )
        phase_time = {"burn_in": 0.0, "sampling": 0.0}
        last_note = time.perf_counter()
        for s, e, length, sampling in chunks:
            if e <= done:  # resumed: this chunk ran before the checkpoint
                continue
            steps = np.arange(s, s + length, dtype=np.int32)
            tic = time.perf_counter()
            carry = compiled[length, sampling](
                carry,
                k_run,
                steps,
                steps < e,
                mask[s : s + length],
                slot[s : s + length],
                train,
                plan.inputs,
            )
            bad = int(carry[3])  # blocks until the chunk is done
            phase_time["sampling" if sampling else "burn_in"] += time.perf_counter() - tic
            if bad >= 0:
                bar.close()
                eps = float(self.step_size(bad, total))
                raise UserError(
                    f"{self.name}: the parameters became non-finite at step {bad + 1} of {total} "
                    f"(step size {eps:.3g}). Lower method.step_size (e.g. by 10x) or raise "
                    f"method.prior_scale."
                )
            collected = int(mask[:e].sum()) * chains
            bar.update(e - s)
            bar.set_postfix_str(f"collected {collected} of {num_samples} samples", refresh=False)
            if bar.disable and time.perf_counter() - last_note > 30:  # no bar: note progress
                last_note = time.perf_counter()
                log.info(
                    "%s: step %d of %d, collected %d of %d samples",
                    self.name,
                    e,
                    total,
                    collected,
                    num_samples,
                )
            log_fn(
                {
                    "sampler/step_size": float(self.step_size(e - 1, total)),
                    "sampler/collected": collected,
                },
                e,
            )
            ckpt.maybe_save(e, carry)
        bar.close()
        ckpt.maybe_save(total, carry, final=True)
        cost.count(grad_evals=total * chains * self.kernel.grads_per_step, samples=num_samples)

        metrics: dict[str, Any] = {"time/compile": compile_s}
        for phase, steps in (("burn_in", burn), ("sampling", total - burn)):
            if steps and phase_time[phase] > 0:
                metrics[f"sampler/{phase}_steps_per_s"] = steps / phase_time[phase]
        log.info(
            "%s: burn-in %d steps in %.1fs, sampling %d steps in %.1fs; %d members",
            self.name,
            burn,
            phase_time["burn_in"],
            total - burn,
            phase_time["sampling"],
            num_samples,
        )
        states, summaries, buffer, _ = carry
        last = states.params
        if "test" in plan.inputs and data.test is not None:
            # The last sample of each chain as a point estimate, for comparison with the
            # posterior predictive (the BlackJAX tutorial's closing check).
            probs = jax.jit(jax.vmap(lambda p: model.probs(p, {}, data.test.x)))(last)
            y = data.test.y
            metrics["test/last_sample_acc"] = float(jnp.mean(probs.argmax(-1) == y))
            metrics["test/last_sample_nll"] = float(M.nll(probs, y, xp=jnp))
        samples = None
        if buffer is not None:  # (M, chains, ...) -> (M * chains, ...)
            samples = jax.tree.map(lambda b: b.reshape(-1, *b.shape[2:]), buffer)
        return SamplePosterior(
            model=model, summaries=summaries, last=last, samples=samples, metrics=metrics
        )

    # ----------------------------------------------------------------- members
    def predict(
        self, key: jax.Array, posterior: SamplePosterior, plan: EvalPlan
    ) -> dict[str, PredictiveSummary]:
        """The summaries folded while sampling (the key is unused)."""
        del key
        missing = set(plan.inputs) - set(posterior.summaries)
        if missing:
            raise UserError(
                f"evaluation sets {sorted(missing)} were not known when sampling; "
                f"SG-MCMC folds members in while it samples."
            )
        return {name: posterior.summaries[name] for name in plan.inputs}

    def members(
        self, key: jax.Array, posterior: SamplePosterior, x: jax.Array, chunk: int = 16
    ) -> Iterator[jax.Array]:
        """Class probabilities (s, N, C) of the kept samples, ``chunk`` samples at a time."""
        del key  # the samples are fixed
        if posterior.samples is None:
            raise UserError(
                "SG-MCMC does not keep its samples by default (members are folded "
                "into the evaluation while sampling); set method.save_samples=true "
                "to keep them for re-evaluation."
            )
        model = posterior.model
        probs = jax.jit(jax.vmap(lambda p: model.probs(p, {}, x)))
        num = jax.tree.leaves(posterior.samples)[0].shape[0]
        for s in range(0, num, chunk):
            yield probs(jax.tree.map(lambda a, s=s: a[s : s + chunk], posterior.samples))

    def save(self, out_dir: str | Path, posterior: SamplePosterior) -> Path | None:
        """Writes the kept samples to ``out_dir/samples.msgpack`` (flax serialization)."""
        if posterior.samples is None:
            return None
        path = Path(out_dir) / "samples.msgpack"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(serialization.msgpack_serialize(jax.device_get(posterior.samples)))
        log.info("wrote %d samples to %s", jax.tree.leaves(posterior.samples)[0].shape[0], path)
        return path

    @property
    def name(self) -> str:
        return self.kernel.step.__qualname__.split(".")[0]


class _ChunkRunner:
    """Compiles ``(carry, key, steps, active, accept, slot, train, inputs) -> carry``: a
    ``lax.scan`` over one chunk of steps, all chains at once.

    Keys derive from (run key, step), so a run does not depend on how it is chunked.
    """

    def __init__(self, method: SGMCMC, model: Model, n: int, total: int):
        self.method, self.model, self.n, self.total = method, model, n, total
        self.grad = jax.grad(make_log_density(model, n, method.prior_scale))

    def compile(self, length: int, sampling: bool, carry, train, inputs):
        fn = jax.jit(lambda *a: self._run(sampling, *a))
        steps = jax.ShapeDtypeStruct((length,), jnp.int32)
        flags = jax.ShapeDtypeStruct((length,), jnp.bool_)
        return fn.lower(
            carry, jax.random.key(0), steps, flags, flags, steps, train, inputs
        ).compile()

    def _run(self, sampling, carry, key, steps, active, accept, slot, train, inputs):
        m, model, grad = self.method, self.model, self.grad
        b = m.batch_size

        def chain_step(k, state, step_size):
            k_batch, k_step = jax.random.split(k)
            idx = jax.random.randint(k_batch, (b,), 0, self.n)
            x, y = train.x[idx], train.y[idx]
            return m.kernel.step(k_step, state, lambda p: grad(p, x, y), step_size, m.temperature)

        def fold(summaries, buffer, params, j):
            for name, x in inputs.items():
                probs = jax.vmap(lambda p, x=x: model.probs(p, {}, x))(params)  # (chains, N, C)
                summaries = {**summaries, name: summaries[name].add(probs)}
            if buffer is not None:
                buffer = jax.tree.map(
                    lambda buf, p: jax.lax.dynamic_update_index_in_dim(
                        buf, p.astype(buf.dtype), j, 0
                    ),
                    buffer,
                    params,
                )
            return summaries, buffer

        def body(carry, inp):
            t, on, acc, j = inp
            # padding steps past the end of the run leave the carry as it is
            return jax.lax.cond(on, lambda c: live(c, t, acc, j), lambda c: c, carry), None

        def live(carry, t, acc, j):
            states, summaries, buffer, bad = carry
            keys = jax.random.split(jax.random.fold_in(key, t), m.num_chains)
            step_size = m.step_size(t, self.total)
            if m.num_chains == 1:  # plain (unbatched) matmuls are faster on CPU
                one = chain_step(keys[0], jax.tree.map(lambda a: a[0], states), step_size)
                states = jax.tree.map(lambda a: a[None], one)
            else:
                states = jax.vmap(chain_step, in_axes=(0, 0, None))(keys, states, step_size)
            finite = jnp.all(
                jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(states.params)])
            )
            bad = jnp.where((bad < 0) & ~finite, t, bad)
            if sampling:
                # an unbatched predicate: lax.cond skips the prediction on other steps
                summaries, buffer = jax.lax.cond(
                    acc & finite,
                    fold,
                    lambda s, bu, p, j: (s, bu),
                    summaries,
                    buffer,
                    states.params,
                    j,
                )
            return states, summaries, buffer, bad

        carry, _ = jax.lax.scan(body, carry, (steps, active, accept, slot))
        return carry
