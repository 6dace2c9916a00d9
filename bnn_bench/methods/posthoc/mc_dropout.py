"""``mc_dropout``: Monte Carlo dropout (Gal & Ghahramani, 2016). S = ``num_samples``.

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
from pathlib import Path
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.methods.base import Method, Need, RunContext, Work
from bnn_bench.methods.map import PointPosterior, checkpoint_path, map_metrics, save_point
from bnn_bench.methods.posthoc import map_point
from bnn_bench.methods.training import Trainer
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


@dataclass(frozen=True)
class MCDropout(Method):
    """A network trained with dropout; S stochastic forward passes with dropout on.

    Attributes:
      trainer: trains the network, with dropout (ignored with ``init_from``).
      init_from: a run folder whose ``checkpoint/map.msgpack`` holds a network of the
        same model (e.g. a ``method=map model.dropout_rate=0.2`` run); None to train.
      num_samples: S, the stochastic forward passes (members).
      chunk_size: passes evaluated together, (chunk_size, N, C) at a time.
    """

    name: ClassVar = "mc_dropout"
    needs: ClassVar = (Need("dropout", True, "rate > 0: without it, its members would all agree"),)

    trainer: Trainer
    init_from: str | None = None
    num_samples: int = 16
    chunk_size: int = 8

    def __post_init__(self):
        if self.num_samples < 1 or self.chunk_size < 1:
            raise UserError(
                f"method.num_samples and method.chunk_size must be >= 1; got "
                f"{self.num_samples} and {self.chunk_size}."
            )
        if self.init_from is not None:
            checkpoint_path(self.init_from)  # fails now, before data or training

    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> PointPosterior:
        ctx = ctx or RunContext()
        self.check(model, data)
        params, state = map_point(key, model, data, self.trainer, self.init_from, ctx)
        ctx.count(samples=self.num_samples)
        return PointPosterior(model=model, params=params, state=state)

    def plan(self, model: Model, data: Dataset) -> Work:
        """Steps and gradient evaluations of the MAP network (0 with ``init_from``),
        members, batch, networks. For ``dry_run``: counts the work of ``fit`` without
        doing it and raises what ``fit`` would refuse."""
        steps = 0 if self.init_from else self.trainer.num_steps(data.train.size)
        return Work(
            steps=steps,
            grad_evals=steps,
            members=self.num_samples,
            batch_size=self.trainer.batch_size,
            networks=1,
        )

    def members(
        self, key: jax.Array, posterior: PointPosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        model = posterior.model
        log_probs = jax.jit(
            lambda p, st, x, k: jax.nn.log_softmax(mc_dropout_logits(model, p, st, x, k), axis=-1)
        )
        keys = jax.random.split(key, self.num_samples)
        for start in range(0, self.num_samples, self.chunk_size):
            yield log_probs(
                posterior.params, posterior.state, x, keys[start : start + self.chunk_size]
            )

    def save(self, out_dir: Path, posterior: PointPosterior) -> Path:
        """Writes the trained network, so a later run can reuse it with ``init_from``."""
        return save_point(out_dir, posterior.params, posterior.state)

    def report(
        self, key: jax.Array, posterior: PointPosterior, sets: dict[str, Split], num_bins: int
    ) -> dict[str, float]:
        """The network with dropout off (the usual dropout prediction):
        ``map/<set>/{acc,nll,ece,brier}``."""
        del key
        return map_metrics(posterior.model, posterior.params, posterior.state, sets, num_bins)
