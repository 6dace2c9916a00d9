"""Flax image classifiers behind one pure ``Model.apply``."""

from bnn_bench.models.base import Model, Params, State, build_model, num_params

__all__ = ["Model", "Params", "State", "build_model", "num_params"]
