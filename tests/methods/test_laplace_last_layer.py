"""``last_layer`` Laplace takes the layer the network applies last, not the last key."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bnn_bench.data import Spec
from bnn_bench.methods.laplace import LastLayer, last_layer
from bnn_bench.models import build_model
from bnn_bench.models.mlp import MLP

pytestmark = pytest.mark.unit


def test_last_layer_follows_the_call_order_not_the_key_order():
    # 11 Dense layers: sorted keys end with Dense_9, the network ends with Dense_10
    spec = Spec("tiny", (2, 2, 1), 3, ("a", "b", "c"), (0.0,), (1.0,))
    model = build_model(MLP(num_classes=3, hidden=(4,) * 10), spec, "mlp")
    params, _ = jax.eval_shape(model.init, jax.random.key(0))
    assert sorted(params)[-1] == "Dense_9"
    assert last_layer(model) == "Dense_10"
    assert LastLayer().head(model) == "Dense_10"  # what method/laplace/structure=last_layer uses
    assert np.shape(params["Dense_10"]["kernel"]) == (4, 3)
