"""Flax image classifiers behind one pure ``Model.apply``."""

from bnn_bench.models.base import Call, Model, Params, State, build_model, module_calls, num_params

__all__ = ["Call", "Model", "Params", "State", "build_model", "module_calls", "num_params"]
