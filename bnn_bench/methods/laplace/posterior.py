"""The Laplace posterior N(θ*, Σ(τ)) over a MAP network's flat parameters.

``LaplacePosterior`` is what ``Laplace.fit`` returns and what every structure, predictive
and prior-precision choice reads: the MAP network, the flat parameters ``theta`` the
Gaussian covers (all, or the last layer's), their curvature and τ.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax.flatten_util import ravel_pytree

from bnn_bench.likelihoods import Likelihood
from bnn_bench.methods.laplace.gaussian import AnyCurvature, from_diagonal
from bnn_bench.models import Model, Params, State


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
        return self.model.apply(params, self.state, x)[0]
