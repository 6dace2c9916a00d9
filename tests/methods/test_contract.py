"""One contract for every method in conf/method/: fit, members, predict.

Each method needs a tiny budget here; a method without one fails the test,
so no method can skip the contract.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.evaluation import EvalPlan
from bnn_bench.models import build_model
from tests.conftest import TINY, compose_cfg, config_choices

# Overrides that make each method quick on the TINY synthetic run.
_TINY_SGMCMC = [
    "method.save_samples=true",
    "method.batch_size=64",
    "method.iterations=60",
    "method.burn_in=30",
    "method.accepted_samples=4",
    "method.num_chains=2",
    "method.chunk_size=30",
]
TINY_METHOD: dict[str, list[str]] = {
    "map": [],
    "sgld": [*_TINY_SGMCMC, "method.step_size.step_size=1e-3"],
    "psgld": [*_TINY_SGMCMC, "method.step_size.step_size=1e-3"],
    # friction 10, ε = 0.01: a Langevin step ε/α = 1e-3 like sgld's, momentum decay 0.9
    "sghmc": [*_TINY_SGMCMC, "method.step_size.step_size=1e-2", "method.kernel.friction=10"],
    "laplace": [
        "method.structure.rank=8",
        "method.curvature_batches=2",
        "method.predictive.num_samples=4",
        "method.chunk_size=3",
    ],
    "ensemble": ["method.size=2"],
    "vote": ["method.n_voters=2"],
    "mcbn": [
        "model=lenet",
        "model.norm=batchnorm",
        "method.num_estimators=3",
        "method.mc_batch_size=16",
    ],
}


def _setup(name: str):
    if name not in TINY_METHOD:
        pytest.fail(f"method {name!r} has no tiny budget in TINY_METHOD")
    own_model = any(o.startswith("model=") for o in TINY_METHOD[name])  # replaces TINY's MLP
    base = [o for o in TINY if not (own_model and o.startswith("model"))]
    cfg = compose_cfg(*base, f"method={name}", *TINY_METHOD[name])
    data = build(cfg.dataset, "dataset")
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(
        module, data.spec, cfg.model._target_.rsplit(".", 1)[-1].lower(), cfg.eval.batch_size
    )
    method = build(cfg.method, "method")
    return data, model, method


@pytest.mark.parametrize("name", config_choices("method"))
def test_method_contract(name):
    data, model, method = _setup(name)
    x = data.test.x[:40]
    plan = EvalPlan({"test": x}, keep=3, capacity=4)
    posterior = method.fit(jax.random.key(0), model, data, plan)
    assert posterior.model is model

    k = jax.random.key(1)
    chunks = list(method.members(k, posterior, x))
    probs = jnp.concatenate(chunks)  # (S, N, C)
    assert probs.ndim == 3 and probs.shape[1:] == (40, data.spec.num_classes)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert bool((probs >= 0).all())
    again = jnp.concatenate(list(method.members(k, posterior, x)))
    np.testing.assert_allclose(again, probs, atol=1e-6)  # same key, same members

    summaries = method.predict(k, posterior, plan)
    assert set(summaries) == {"test"}
    s = summaries["test"]
    assert int(s.count) == probs.shape[0]
    np.testing.assert_allclose(s.mean(), probs.mean(0), atol=1e-5)
    # the members' accuracy is well above chance on the learnable synthetic data
    assert float((s.mean().argmax(-1) == data.test.y[:40]).mean()) > 0.3
