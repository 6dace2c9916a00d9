"""Model complexity for the results table: parameters and FLOPs per forward pass."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bnn_bench.models import Model


def flops_per_input(model: Model) -> float:
    """FLOPs of one evaluation-mode forward pass on one uint8 input, from XLA's cost
    analysis of the compiled function (``jax.jit(f).lower(...).compile()``).

    XLA counts a multiply-add as 2 FLOPs and each elementwise op (bias, activation,
    normalisation, the input preprocessing) as 1 per element; the count is the
    compiled program's on this backend, so it can differ slightly between CPU and
    GPU. NaN when the backend gives no estimate.
    """
    params, state = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((1, *model.spec.shape), jnp.uint8)
    try:
        forward = jax.jit(lambda p, s, x: model.apply(p, s, x)[0])
        cost = forward.lower(params, state, x).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - an estimate only; never fail a run for it
        return math.nan
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return float(cost.get("flops", math.nan)) if cost else math.nan
