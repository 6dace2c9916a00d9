"""``mc_dropout``: Monte Carlo dropout (Gal & Ghahramani, 2016). S = ``members``.

A network trained with dropout keeps dropout on at test time; member s is one
stochastic forward pass with its own masks:

    p_s(y | x) = softmax f(x; θ ⊙ m_s),   m_s ~ Bernoulli(1 − rate) per unit, scaled 1/(1 − rate)

Every other layer stays in evaluation mode (BatchNorm uses its running statistics), as
TorchUncertainty's ``mc_dropout`` wrapper switches only the dropout modules to training
mode. Each input draws its own masks in each pass. The network is trained with the
``trainer`` group (dropout on, the network ``method=map`` trains with the same seed) or
loaded from an earlier run (``init_from``). The model must have dropout
(``model.dropout_rate`` > 0). That network with dropout off (the usual deterministic
dropout prediction) is reported as ``map/<set>/*``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_bench.data import Dataset
from bnn_bench.errors import UserError
from bnn_bench.methods.base import Need, RunContext, Work
from bnn_bench.methods.point.map import PointPosterior
from bnn_bench.methods.posthoc.base import PostHoc
from bnn_bench.models import Model, Params, State, module_calls


def dropout(key: jax.Array, x: jax.Array, rate: float, broadcast_dims: Sequence[int] = ()):
    """Inverted dropout, as ``flax.linen.Dropout`` in training mode: each element of x is
    kept with probability 1 − rate and scaled by 1/(1 − rate), else zeroed; the mask is
    shared along ``broadcast_dims`` (e.g. (1, 2): whole channels of an image)."""
    if rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    shape = list(x.shape)
    for d in broadcast_dims:
        shape[d] = 1
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(jnp.broadcast_to(keep, x.shape), x / (1.0 - rate), jnp.zeros_like(x))


def _dropout_on(next_fun, args, kwargs, context):
    """A flax interceptor: every ``nn.Dropout`` call masks, whatever its ``deterministic``."""
    mod = context.module
    if not isinstance(mod, nn.Dropout) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if mod.rate == 0.0:
        return args[0]
    return dropout(mod.make_rng(mod.rng_collection), args[0], mod.rate, mod.broadcast_dims)


def stochastic_logits(
    model: Model, params: Params, state: State, x: jax.Array, key: jax.Array
) -> jax.Array:
    """Logits (B, C) of uint8 inputs x (B, H, W, C) in evaluation mode with dropout on.

    Every dropout layer draws its masks from ``key``; everything else (BatchNorm) is in
    evaluation mode. With every dropout rate 0 it equals ``model.apply(params, state, x)``.
    """
    with nn.intercept_methods(_dropout_on):
        return model.apply(params, state, x, train=False, key=key)[0]


def mc_dropout_logits(
    model: Model, params: Params, state: State, x: jax.Array, keys: jax.Array
) -> jax.Array:
    """Logits (s, N, C): one stochastic pass per key of ``keys`` (s,) over all N inputs.

    The inputs go ``model.batch_size`` at a time; batch i of pass s uses
    ``fold_in(keys[s], i)``. Jittable.
    """
    n = x.shape[0]
    b = max(1, min(model.batch_size, n))
    pad = (-n) % b
    xb = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(-1, b, *x.shape[1:])

    def one_pass(key):
        out = jax.lax.map(
            lambda ib: stochastic_logits(
                model, params, state, ib[1], jax.random.fold_in(key, ib[0])
            ),
            (jnp.arange(xb.shape[0]), xb),
        )  # (nb, b, C)
        return out.reshape(-1, out.shape[-1])[:n]

    return jax.vmap(one_pass)(keys)


def dropout_rates(model: Model) -> list[float]:
    """The rate of every ``nn.Dropout`` call in one forward pass of ``model`` (no compute)."""
    return [float(c.module.rate) for c in module_calls(model) if isinstance(c.module, nn.Dropout)]


@dataclass(frozen=True, kw_only=True)
class MCDropout(PostHoc):
    """A network trained with dropout; S stochastic forward passes with dropout on.

    Attributes:
      trainer, init_from: the network, trained with dropout (``PostHoc``); ``init_from``
        e.g. a ``method=map model.dropout_rate=0.2`` run.
      members: S, the stochastic forward passes (members).
      members_per_chunk: passes evaluated together, (s, N, C) at a time.
    """

    name: ClassVar = "mc_dropout"
    needs: ClassVar = (Need("dropout", True, "rate > 0: without it, its members would all agree"),)

    members: int = 16
    members_per_chunk: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.members < 1 or self.members_per_chunk < 1:
            raise UserError(
                f"method.members and method.members_per_chunk must be >= 1; got "
                f"{self.members} and {self.members_per_chunk}."
            )

    def fit_map(
        self,
        key: jax.Array,
        model: Model,
        data: Dataset,
        params: Params,
        state: State,
        ctx: RunContext,
    ) -> PointPosterior:
        """The trained network itself: its members draw their masks in ``member_log_probs``."""
        del key, data
        ctx.count(samples=self.members)
        return PointPosterior(model=model, params=params, state=state)

    def plan_map(self, model: Model, data: Dataset) -> Work:
        """No steps after the MAP; ``members`` members."""
        return Work(steps=0, grad_evals=0, members=self.members, batch_size=0)

    def member_log_probs(
        self, key: jax.Array, posterior: PointPosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        """``members`` members in chunks (s, N, C), or (s, N, 2) for the Gaussian likelihood:
        pass s masks with ``split(key, members)[s]``."""
        model = posterior.model
        log_probs = jax.jit(
            lambda p, st, x, k: model.likelihood.member(mc_dropout_logits(model, p, st, x, k))
        )
        keys = jax.random.split(key, self.members)
        for start in range(0, self.members, self.members_per_chunk):
            yield log_probs(
                posterior.params, posterior.state, x, keys[start : start + self.members_per_chunk]
            )
