"""``mcbn``: Monte Carlo Batch Normalisation (Teye et al., 2018), as TorchUncertainty's
``MCBatchNorm``. S = ``members``.

Train a MAP network that has BatchNorm (``trainer``); then estimator s replaces
every BatchNorm layer's statistics by those of its own random training minibatch
B_s of ``mc_batch_size`` inputs:

    μ_s = mean_{B_s} h,   σ²_s = var_{B_s} h,   p_s(y | x) = softmax f(x; θ, μ_s, σ²_s)

with h a layer's input, the earlier layers normalised by their own B_s statistics
(as TorchUncertainty's ``MCBatchNorm2d`` accumulates, in evaluation mode). σ²_s is
the biased batch variance (divided by the n values it averages over), what
training-mode BatchNorm normalises with and so Teye et al.'s estimator;
``unbiased_variance=True`` divides by n - 1 instead, as TorchUncertainty's
``x.var(..., unbiased=True)``. The
statistics are fitted once in ``fit`` (TorchUncertainty's ``MCBatchNorm.fit``) and
reused for every test batch, so the same estimator normalises every input alike.

The trained network's running statistics are kept beside them: the MAP prediction
is reported as ``map/<split>/{acc,nll,ece,brier}``, and ``save`` writes the MAP
network for a later run's ``init_from``. The MAP part is trained from
the same key as ``method=map`` uses, so it is the network a ``map`` run with the
same seed and trainer gives, or loaded from such a run (``init_from``); the
minibatches are drawn from ``fold_in(key, _MC_SALT)`` either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct, traverse_util

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.methods.base import Need, RunContext, Work
from bnn_bench.methods.posthoc.base import PostHoc
from bnn_bench.models import Model, Params, State

_MC_SALT = 0x6D63626E  # "mcbn": the minibatch key, apart from the MAP training's keys
_CHUNK = 8  # estimators evaluated together (bounds memory for large members)


@struct.dataclass
class MCBNPosterior:
    """The MAP network, its trained running statistics, and S sets of MC statistics.

    Attributes:
      params: the trained parameters.
      state: the trained model state (``{"batch_stats": running statistics}``): the MAP.
      mc_stats: a ``batch_stats`` tree whose leaves are (S, features): estimator s's
        per-layer ``mean`` and ``var``.
    """

    model: Model = struct.field(pytree_node=False)
    params: Params
    state: State
    mc_stats: dict
    info: dict[str, float] = struct.field(default_factory=dict)

    @property
    def members(self) -> int:
        return int(jax.tree.leaves(self.mc_stats)[0].shape[0])


def batch_norm_statistics(
    model: Model, params: Params, state: State, x: jax.Array, unbiased_variance: bool = False
) -> dict:
    """Every BatchNorm layer's input statistics on one batch, layer by layer.

    Each layer's input is normalised by its own batch mean and variance (what it
    stores), so a later layer sees its inputs as the estimator will.

    Args:
      x: (m, H, W, C) uint8 inputs (m >= 2).
      unbiased_variance: divide the sum of squares by n - 1 (TorchUncertainty) rather
        than by the n values per feature (training-mode BatchNorm, Teye et al.).

    Returns:
      A tree shaped like ``state["batch_stats"]``: ``{"mean", "var"}`` per layer.
    """
    found: dict[tuple[str, ...], jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if not isinstance(mod, nn.BatchNorm) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        h = args[0]
        axes = mod.axis if isinstance(mod.axis, tuple | list) else (mod.axis,)
        feature = tuple(sorted(a % h.ndim for a in axes))
        reduce = tuple(i for i in range(h.ndim) if i not in feature)
        n = math.prod(h.shape[i] for i in reduce)
        mean = jnp.mean(h, reduce, keepdims=True)
        dof = max(n - 1, 1) if unbiased_variance else n
        var = jnp.sum(jnp.square(h - mean), reduce, keepdims=True) / dof
        shape = [h.shape[i] for i in feature]
        found[(*mod.path, "mean")] = mean.reshape(shape)
        found[(*mod.path, "var")] = var.reshape(shape)
        y = (h - mean) * jax.lax.rsqrt(var + mod.epsilon)
        if mod.use_scale:
            y = y * mod.get_variable("params", "scale").reshape(mean.shape)
        if mod.use_bias:
            y = y + mod.get_variable("params", "bias").reshape(mean.shape)
        return y

    with nn.intercept_methods(interceptor):
        model.apply(params, state, x, train=False)
    return traverse_util.unflatten_dict(found)


@dataclass(frozen=True, kw_only=True)
class MCBN(PostHoc):
    """A MAP network whose BatchNorm statistics come from random training minibatches.

    Attributes:
      trainer, init_from: the MAP network, with BatchNorm (``PostHoc``).
      members: S, the number of minibatches (members).
      mc_batch_size: inputs per minibatch (at most the training split's size).
      unbiased_variance: store the unbiased batch variance (TorchUncertainty's
        convention) instead of the biased one (training-mode BatchNorm, Teye et al.).
    """

    name: ClassVar = "mcbn"
    needs: ClassVar = (Need("batch_norm", True, "its members are batch-norm statistics"),)

    members: int = 8
    mc_batch_size: int = 32
    unbiased_variance: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.members < 1:
            raise UserError(f"method.members must be >= 1; got {self.members}.")
        if self.mc_batch_size < 2:
            raise UserError(
                f"method.mc_batch_size must be >= 2 (a variance needs two "
                f"inputs); got {self.mc_batch_size}."
            )

    def check(self, model: Model, data: Dataset) -> None:
        """Refuses a model without batch norm (``needs``) and a batch larger than train."""
        super().check(model, data)
        self._check_batch(data.train.size)

    def _check_batch(self, n_train: int) -> None:
        if self.mc_batch_size > n_train:
            raise UserError(
                f"method.mc_batch_size={self.mc_batch_size} is larger than the "
                f"training split ({n_train} inputs); lower it."
            )

    def fit_map(
        self,
        key: jax.Array,
        model: Model,
        data: Dataset,
        params: Params,
        state: State,
        ctx: RunContext,
    ) -> MCBNPosterior:
        """The MC statistics of the MAP network ``(params, state)`` (``fit_statistics``),
        from the minibatches of ``fold_in(key, _MC_SALT)``."""
        ctx.count(samples=self.members)
        return self.fit_statistics(
            jax.random.fold_in(key, _MC_SALT), model, params, state, data.train
        )

    def fit_statistics(
        self, key: jax.Array, model: Model, params: Params, state: State, train: Split
    ) -> MCBNPosterior:
        """Draws ``members`` random minibatches of ``mc_batch_size`` distinct training
        inputs and stores each one's BatchNorm statistics (TorchUncertainty's
        ``MCBatchNorm.fit``). ``params``/``state`` are the trained network's, kept as is."""
        n = train.size
        self._check_batch(n)
        idx = jax.vmap(
            lambda s: jax.random.permutation(jax.random.fold_in(key, s), n)[: self.mc_batch_size]
        )(jnp.arange(self.members))  # (S, m)
        fit_stats = jax.jit(
            lambda p, st, x, i: jax.lax.map(
                lambda ii: batch_norm_statistics(model, p, st, x[ii], self.unbiased_variance), i
            )
        )
        mc_stats = fit_stats(params, state, train.x, idx)
        return MCBNPosterior(model=model, params=params, state=state, mc_stats=mc_stats)

    def member_log_probs(
        self, key: jax.Array, posterior: MCBNPosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        """The estimators in chunks (s, N, C): the MAP network normalised with each one's
        statistics (the same for any ``key``: they were drawn in ``fit``)."""
        del key
        model = posterior.model
        log_probs = jax.jit(
            jax.vmap(
                lambda p, st, stats, x: model.log_probs(p, {**st, "batch_stats": stats}, x),
                in_axes=(None, None, 0, None),
            )
        )
        s = posterior.members
        for start in range(0, s, _CHUNK):
            stats = jax.tree.map(lambda a, i=start: a[i : i + _CHUNK], posterior.mc_stats)
            yield log_probs(posterior.params, posterior.state, stats, x)  # (s, N, C)

    def plan_map(self, model: Model, data: Dataset) -> Work:
        """No steps after the MAP (the statistics are forward passes); the estimators."""
        return Work(steps=0, grad_evals=0, members=self.members, batch_size=0)
