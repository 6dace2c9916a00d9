"""The Laplace posterior N(θ*, Σ(τ)) over a MAP network's flat parameters.

``LaplacePosterior`` is what ``Laplace.fit`` returns and what every structure, predictive
and prior-precision choice reads: the MAP network, the flat parameters ``theta`` the
Gaussian covers (all, or the last layer's), their curvature and τ.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.flatten_util import ravel_pytree

from bnn_bench.likelihoods import Likelihood
from bnn_bench.methods.laplace.gaussian import AnyCurvature, from_diagonal
from bnn_bench.models import Model, Params, State
from bnn_bench.models.base import map_batches


@struct.dataclass
class LaplacePosterior:
    """N(θ*, Σ(τ)) over the flat parameters ``theta`` (all of them, or the last layer's).

    Attributes:
      model: the network.
      params, state: the MAP network (all parameters) and its batch-norm statistics.
      theta: (P,) the MAP values of the parameters the Gaussian is over.
      curvature: G ≈ U diag(s) Uᵀ + diag(d), scaled to the training-set size.
      prior_precision: () τ.
      unravel: flat (P,) -> the parameter pytree ``theta`` came from.
      head: the last layer's key in ``params`` for ``last_layer``, else None.
      on_head_inputs: ``logits_fn`` reads the head layer's inputs (N, D), not the network's
        (``with_head_inputs``).
      info: ``laplace/*`` numbers for metrics.json: prior precision, evidence, timings.
    """

    model: Model = struct.field(pytree_node=False)
    params: Params
    state: State
    theta: jax.Array
    curvature: AnyCurvature
    prior_precision: jax.Array
    unravel: Callable = struct.field(pytree_node=False)
    head: str | None = struct.field(pytree_node=False, default=None)
    on_head_inputs: bool = struct.field(pytree_node=False, default=False)
    info: dict[str, float] = struct.field(default_factory=dict)

    @classmethod
    def at_map(
        cls, model: Model, params: Params, state: State, head: str | None
    ) -> LaplacePosterior:
        """The posterior before its curvature is known: centred at the MAP ``params``
        (over the ``head`` layer's parameters, or all), curvature 0, τ = 1."""
        theta, unravel = ravel_pytree(params[head] if head is not None else params)
        return cls(
            model=model,
            params=params,
            state=state,
            theta=theta,
            curvature=from_diagonal(jnp.zeros_like(theta)),
            prior_precision=jnp.ones(()),
            unravel=unravel,
            head=head,
        )

    @property
    def likelihood(self) -> Likelihood:
        """p(y | f) of the network's outputs f (the model's): its Fisher is the GGN's Λ,
        its ``member`` what a member yields."""
        return self.model.likelihood

    def logits_fn(self, theta: jax.Array, x: jax.Array) -> jax.Array:
        """Evaluation-mode outputs (B, K) of inputs x (logits, or a Gaussian's mean and log
        σ) with the Gaussian's parameters set to ``theta`` (P,) and the others at the MAP."""
        sub = self.unravel(theta)
        params = {**self.params, self.head: sub} if self.head is not None else sub
        if not self.on_head_inputs:
            return self.model.apply(params, self.state, x)[0]
        # the head reads x in place of what the layers before it give for a dummy input;
        # under jit those layers are dead code, which XLA removes
        dummy = jnp.zeros((x.shape[0], *self.model.spec.shape), self.model.spec.dtype)
        with nn.intercept_methods(partial(_at_head, (self.head,), replace=x)):
            return self.model.apply(params, self.state, dummy)[0]

    def with_head_inputs(self, x: jax.Array) -> tuple[LaplacePosterior, jax.Array]:
        """(the posterior whose ``logits_fn`` reads the head layer's inputs, those inputs
        (N, D) for x (N, ...)), computed once; (self, x) for a posterior over every
        parameter, or one that reads head inputs already. The layers before the head are
        fixed at the MAP, so a predictive or a τ search that evaluates many members or
        many τ on the same inputs needs their forward pass once, not once per chunk of
        members or per τ."""
        if self.head is None or self.on_head_inputs:
            return self, x
        return self.replace(on_head_inputs=True), _head_inputs(self, x, self.model.batch_size)


def _at_head(path, next_fun, args, kwargs, context, replace=None, seen=None):
    """A flax interceptor: at the ``__call__`` of the module at ``path``, hands its input
    to ``seen`` (a list), or calls it on ``replace`` in place of its input."""
    if context.method_name == "__call__" and tuple(context.module.path) == path:
        if seen is not None:
            seen.append(args[0])
        if replace is not None:
            args = (replace, *args[1:])
    return next_fun(*args, **kwargs)


@partial(jax.jit, static_argnames=("batch_size",))
def _head_inputs(post: LaplacePosterior, x: jax.Array, batch_size: int) -> jax.Array:
    """(N, D) what the head layer of the MAP network reads for inputs x (N, ...)."""

    def batch_fn(xb):
        seen = []
        with nn.intercept_methods(partial(_at_head, (post.head,), seen=seen)):
            post.model.apply(post.params, post.state, xb)
        if len(seen) != 1:  # last_layer() names a layer the forward pass calls once
            raise ValueError(f"layer {post.head} was called {len(seen)} times, not once")
        return seen[0]

    return map_batches(batch_fn, x, batch_size)
