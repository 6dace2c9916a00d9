"""Flax image classifiers behind one pure ``Model.apply``."""

from bnn_bench.models.base import (
    TRAITS,
    Call,
    Model,
    Params,
    State,
    Trait,
    build_model,
    module_calls,
    num_params,
)

__all__ = [
    "TRAITS",
    "Trait",
    "Call",
    "Model",
    "Params",
    "State",
    "build_model",
    "module_calls",
    "num_params",
]
