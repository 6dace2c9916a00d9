"""``vi``: mean-field Gaussian variational inference (Bayes by Backprop; Blundell et al.,
2015). S = ``members``.

Every parameter gets an independent Gaussian, q(θ) = Π_i N(θ_i; μ_i, σ_i²) with
σ = softplus(ρ), fitted by maximising the evidence lower bound

    ELBO(μ, ρ) = E_q[Σ_n log p(y_n | x_n, θ)] − β_t · KL(q ‖ p),   p(θ) = N(0, s² I),

the prior of SG-MCMC (``prior_scale`` s; ``sgmcmc.make_log_density``). Each step
minimises the minibatch estimate per training example, ``−mean_b log p(y_b | x_b, θ) +
β_t KL / N``, averaged over ``num_train_samples`` draws, with the ``trainer``'s optax
optimiser, schedule and epochs. β_t rises linearly from 1/W to 1 over the first W steps
(``kl_warmup_epochs``; 0: β = 1 throughout, the ELBO itself).

The draws inside a training step are made where they cost least variance:

- dense layers (``nn.Dense``): the local reparameterisation trick (Kingma, Salimans &
  Welling, 2015). The pre-activation of each example is drawn from its exact marginal,
  ``a = x μ_W + μ_b + √(x² σ_W² + σ_b²) ⊙ ε``, ε ~ N(0, I) per example and unit;
- convolutions (``nn.Conv``, ``models.layers.Conv``): Flipout (Wen et al., 2018). One
  perturbation Δ = σ ⊙ ε per step, decorrelated across the batch by random signs,
  ``a = conv(x; μ) + conv(x ⊙ s_in; Δ) ⊙ s_out``, s_in, s_out ∈ {±1} per example and
  channel; each example sees a weight drawn from q exactly;
- every other parameter: plain reparameterisation, θ = μ + σ ⊙ ε, one draw per step.

Both intercept the layers' ``__call__`` (``flax.linen.intercept_methods``), so any
project model works unchanged. A model with batch norm is refused (its running
statistics are not parameters a Gaussian can describe; as SG-MCMC), and so is one with
dropout (its masks would be a second, unasked-for noise).

Members are whole networks, θ_s = μ + σ ⊙ ε_s: member s is the same function for every
input, as a posterior sample should be.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct, traverse_util

from bnn_bench import run_folder
from bnn_bench.data import Dataset
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.methods.base import Method, Need, RunContext, Work
from bnn_bench.methods.training import Trainer, epoch_batches, scan_steps
from bnn_bench.models import Model, Params, module_calls
from bnn_bench.models.layers import Conv

log = logging.getLogger(__name__)

STD = "vi_std"  # the variable collection that carries σ into the intercepted layers
CHECKPOINT = run_folder.VI_POSTERIOR  # inside a run folder
_TINY = 1e-16  # keeps √ of a zero variance differentiable

LogLik = Callable[[Params, Params, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class VIState(NamedTuple):
    """The training state of ``vi``."""

    mean: Params  # μ, the same tree as the model's parameters
    rho: Params  # ρ, σ = softplus(ρ)
    opt_state: Any  # the optimiser's state over (μ, ρ)
    step: jax.Array  # () int32, steps taken (for the KL warm-up)


@struct.dataclass
class VIPosterior:
    """A mean-field Gaussian over the parameters: N(mean, diag(std²))."""

    model: Model = struct.field(pytree_node=False)
    mean: Params
    std: Params
    info: dict[str, float] = struct.field(default_factory=dict)


def softplus_inverse(y: jax.Array | float) -> jax.Array:
    """ρ with softplus(ρ) = y > 0: ``y + log(−expm1(−y))``, stable for small and large y."""
    y = jnp.asarray(y, jnp.float32)
    return y + jnp.log(-jnp.expm1(-y))


def kl_divergence(mean: Params, std: Params, prior_scale: float) -> jax.Array:
    """KL(N(μ, diag σ²) ‖ N(0, s² I)) = Σ_i [log(s/σ_i) + (σ_i² + μ_i²) / (2 s²) − ½]."""

    def leaf(m, sd):
        return jnp.sum(
            jnp.log(prior_scale) - jnp.log(sd) + (sd**2 + m**2) / (2 * prior_scale**2) - 0.5
        )

    return sum(jax.tree.leaves(jax.tree.map(leaf, mean, std)))


def sample_params(key: jax.Array, mean: Params, std: Params) -> Params:
    """One draw θ = μ + σ ⊙ ε of every parameter."""
    leaves, treedef = jax.tree.flatten(mean)
    keys = jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))
    return jax.tree.map(
        lambda k, m, sd: m + sd * jax.random.normal(k, m.shape, m.dtype), keys, mean, std
    )


# ------------------------------------------------- local reparameterisation, Flipout


def _rademacher(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.rademacher(key, shape, jnp.float32)


def _perturb(next_fun, args, kwargs, context):
    """A flax interceptor: a dense or convolution layer whose σ is in the ``STD``
    collection returns a draw of its output under q (local reparameterisation for dense
    layers, Flipout for convolutions); every other call runs as it is."""
    mod = context.module
    if (
        context.method_name != "__call__"
        or not isinstance(mod, nn.Dense | nn.Conv | Conv)
        or not mod.has_variable(STD, "kernel")
    ):
        return next_fun(*args, **kwargs)
    x = args[0]
    mean = next_fun(*args, **kwargs)  # the layer at μ: x μ_W + μ_b
    std = dict(mod.variables[STD])
    # the same layer, unbound, on given parameters: the output is linear in them
    layer = mod.clone(parent=None)
    key = mod.make_rng("dropout")
    if isinstance(mod, nn.Dense):
        var = layer.apply({"params": jax.tree.map(jnp.square, std)}, jnp.square(x))
        eps = jax.random.normal(key, mean.shape, mean.dtype)
        return mean + jnp.sqrt(var + _TINY) * eps
    k_in, k_out, k_w = jax.random.split(key, 3)
    batch = (x.shape[0],) + (1,) * (x.ndim - 2)
    delta = sample_params(k_w, jax.tree.map(jnp.zeros_like, std), std)  # Δ = σ ⊙ ε
    s_in = _rademacher(k_in, (*batch, x.shape[-1]))
    s_out = _rademacher(k_out, (*batch, mean.shape[-1]))
    return mean + layer.apply({"params": delta}, x * s_in) * s_out


def perturbed_layers(model: Model) -> set[tuple[str, ...]]:
    """The module paths of the layers ``perturbed_logits`` draws by local
    reparameterisation or Flipout (one forward pass, no compute)."""
    return {c.path for c in module_calls(model) if isinstance(c.module, nn.Dense | nn.Conv | Conv)}


def perturbed_logits(
    model: Model,
    mean: Params,
    std: Params,
    x: jax.Array,
    key: jax.Array,
    layers: set[tuple[str, ...]],
) -> jax.Array:
    """Logits (B, C) of uint8 inputs x (B, H, W, C) under one draw from q: the layers in
    ``layers`` (``perturbed_layers``) draw their outputs by local reparameterisation
    (dense) or Flipout (convolutions); every other parameter is drawn once, μ + σ ⊙ ε.

    Differentiable in ``mean`` and ``std``. The layers' noise comes from ``key`` through
    ``Model.apply``'s rng stream.
    """
    k_layers, k_rest = jax.random.split(key)
    flat_mean, flat_std = traverse_util.flatten_dict(mean), traverse_util.flatten_dict(std)
    rest = [p for p in flat_mean if p[:-1] not in layers]
    drawn = sample_params(k_rest, [flat_mean[p] for p in rest], [flat_std[p] for p in rest])
    params = traverse_util.unflatten_dict(flat_mean | dict(zip(rest, drawn, strict=True)))
    layer_std = traverse_util.unflatten_dict(
        {p: s for p, s in flat_std.items() if p[:-1] in layers}
    )
    with nn.intercept_methods(_perturb):
        return model.apply(params, {STD: layer_std}, x, key=k_layers)[0]


# ------------------------------------------------------------------ the ELBO step


def make_elbo_step(
    log_likelihood: LogLik,
    tx: optax.GradientTransformation,
    data_size: int,
    prior_scale: float,
    num_train_samples: int,
    warmup_steps: int,
) -> Callable[[VIState, jax.Array, jax.Array, jax.Array], tuple[VIState, tuple]]:
    """One optimiser step on the negative ELBO per training example,
    ``−mean_m mean_b log p(y_b | x_b, θ_m) + β_t KL(q ‖ N(0, s² I)) / N``.

    Args:
      log_likelihood: ``(mean, std, x (B, ...), y (B,), key) -> (log p(y_b | x_b, θ)
        (B,), correct (B,))`` under one draw θ ~ q (its key; ``correct`` feeds the
        logged accuracy).
      tx: the optimiser over (μ, ρ).
      data_size: N, the training examples.
      prior_scale: s.
      num_train_samples: M draws of the expected log-likelihood per step.
      warmup_steps: W; β_t = min(1, (t + 1) / W) at step t (0: β = 1).

    Returns:
      ``step(state, x, y, key) -> (state, (loss, acc, nll))``, pure; loss is the objective
      at the step's draws, nll its first term alone (what the divergence check bounds).
    """

    def loss_fn(mean_rho, x, y, key, beta):
        mean, rho = mean_rho
        std = jax.tree.map(jax.nn.softplus, rho)
        keys = jax.random.split(key, num_train_samples)
        loglik, correct = jax.vmap(lambda k: log_likelihood(mean, std, x, y, k))(keys)
        kl = kl_divergence(mean, std, prior_scale)
        nll = -jnp.mean(loglik)
        return nll + beta * kl / data_size, (jnp.mean(correct), nll)

    def step(state: VIState, x, y, key):
        beta = jnp.minimum(1.0, (state.step + 1) / warmup_steps) if warmup_steps else 1.0
        mean_rho = (state.mean, state.rho)
        (loss, (acc, nll)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            mean_rho, x, y, key, beta
        )
        updates, opt_state = tx.update(grads, state.opt_state, mean_rho)
        mean, rho = optax.apply_updates(mean_rho, updates)
        return VIState(mean, rho, opt_state, state.step + 1), (loss, acc, nll)

    return step


def classification_log_likelihood(model: Model, layers: set[tuple[str, ...]]) -> LogLik:
    """``log_likelihood`` of ``make_elbo_step`` for a softmax classifier: log softmax of
    ``perturbed_logits`` at the labels, and whether the argmax is right."""

    def log_likelihood(mean, std, x, y, key):
        logits = perturbed_logits(model, mean, std, x, key, layers)
        loglik = jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
        return loglik, (jnp.argmax(logits, -1) == y).astype(jnp.float32)

    return log_likelihood


# ------------------------------------------------------------------------- method


@dataclass(frozen=True)
class VI(Method):
    """Mean-field Gaussian VI trained with the ``trainer``'s optimiser and budget.

    Attributes:
      trainer: optimiser, schedule, epochs and batch size of the ELBO's ascent
        (``trainer.l2`` must be 0: the prior is ``prior_scale``).
      prior_scale: s of the prior N(0, s² I) on every parameter.
      init_std: σ of every parameter at the start (ρ = softplus⁻¹(init_std)); μ starts
        at the model's initialisation.
      kl_warmup_epochs: epochs over which the KL weight β rises linearly to 1 (0: none).
      num_train_samples: Monte Carlo draws of the expected log-likelihood per step.
      members: S, the networks drawn from q at test time (members).
      members_per_chunk: members evaluated together, (s, N, C) at a time.
    """

    name: ClassVar = "vi"
    needs: ClassVar = (
        Need("batch_norm", False, "its running statistics are not parameters q can describe"),
        Need("dropout", False, "q draws the noise; dropout would add a second"),
    )

    trainer: Trainer
    prior_scale: float = 1.0
    init_std: float = 1e-3
    kl_warmup_epochs: float = 0.0
    num_train_samples: int = 1
    members: int = 16
    members_per_chunk: int = 8

    def __post_init__(self):
        if not (self.prior_scale > 0 and self.init_std > 0):
            raise UserError(
                f"method.prior_scale and method.init_std must be > 0; got "
                f"{self.prior_scale} and {self.init_std}."
            )
        if self.kl_warmup_epochs < 0:
            raise UserError(f"method.kl_warmup_epochs must be >= 0; got {self.kl_warmup_epochs}.")
        if min(self.num_train_samples, self.members, self.members_per_chunk) < 1:
            raise UserError(
                "method.num_train_samples, method.members and method.members_per_chunk must "
                "be >= 1."
            )
        if self.trainer.l2:
            raise UserError(
                f"method=vi: trainer.l2={self.trainer.l2} would decay the variational "
                f"parameters; the prior is method.prior_scale. Set trainer.l2=0."
            )

    def warmup_steps(self, n: int) -> int:
        return round(self.kl_warmup_epochs * self.trainer.steps_per_epoch(n))

    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> VIPosterior:
        ctx = ctx or RunContext()
        self.check(model, data)
        k_init, k_data, k_noise = jax.random.split(key, 3)
        mean, _ = model.init(k_init)
        rho = jax.tree.map(lambda m: jnp.full_like(m, softplus_inverse(self.init_std)), mean)
        n = data.train.size
        tx = self.trainer.make_optimizer(self.trainer.num_steps(n))
        layers = perturbed_layers(model)
        step = make_elbo_step(
            classification_log_likelihood(model, layers),
            tx,
            n,
            self.prior_scale,
            self.num_train_samples,
            self.warmup_steps(n),
        )

        @jax.jit
        def evaluate(vs: VIState, x, y):  # the network at μ
            probs = model.probs(vs.mean, {}, x)
            return M.nll(probs, y, xp=jnp), jnp.mean(probs.argmax(-1) == y)

        tic = time.perf_counter()
        vs = self.trainer.run_loop(
            ctx,
            "vi",
            VIState(mean, rho, tx.init((mean, rho)), jnp.zeros((), jnp.int32)),
            data,
            scan_steps(step, num_outputs=3, augment=model.spec.augment),
            epoch_idx=lambda e: epoch_batches(
                jax.random.fold_in(k_data, e), n, self.trainer.batch_size
            ),
            chunk_keys=lambda s, z: jax.random.split(jax.random.fold_in(k_noise, s), z),
            evaluate=evaluate,
            grad_evals_per_step=self.num_train_samples,
            desc="vi",
        )
        std = jax.tree.map(jax.nn.softplus, vs.rho)
        stds = np.concatenate([np.ravel(s) for s in jax.tree.leaves(std)])
        info = {
            "vi/kl_per_example": float(kl_divergence(vs.mean, std, self.prior_scale)) / n,
            "vi/std_median": float(np.median(stds)),
            "vi/std_mean": float(stds.mean()),
        }
        log.info("vi: fitted in %.1fs; %s", time.perf_counter() - tic, info)
        ctx.count(samples=self.members)
        return VIPosterior(model=model, mean=vs.mean, std=std, info=info)

    def member_log_probs(
        self, key: jax.Array, posterior: VIPosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        model = posterior.model

        @jax.jit
        def log_probs(mean, std, x, keys):  # (s, N, C)
            return jax.vmap(lambda k: model.log_probs(sample_params(k, mean, std), {}, x))(keys)

        keys = jax.random.split(key, self.members)
        for start in range(0, self.members, self.members_per_chunk):
            yield log_probs(
                posterior.mean, posterior.std, x, keys[start : start + self.members_per_chunk]
            )

    def save(self, out_dir: Path, posterior: VIPosterior) -> Path:
        """Writes q to ``<out_dir>/checkpoint/vi.msgpack``: ``{"mean", "std"}``, each
        the tree of the model's parameters."""
        path = Path(out_dir) / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        tree = {"mean": posterior.mean, "std": posterior.std}
        path.write_bytes(serialization.to_bytes(tree))
        return path

    def plan(self, model: Model, data: Dataset) -> Work:
        """Steps, gradient evaluations (steps × num_train_samples), members, batch.

        For ``dry_run``: counts the work of ``fit`` without doing it (``data`` may hold
        shapes only); ``check`` makes the refusals."""
        steps = self.trainer.num_steps(data.train.size)
        return Work(
            steps=steps,
            grad_evals=steps * self.num_train_samples,
            members=self.members,
            batch_size=self.trainer.batch_size,
            networks=1,
        )
