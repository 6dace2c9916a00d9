"""MAP with the Gaussian likelihood on y = a x + b + σ ε recovers a, b (and σ with learned
noise): against the truth within 3 standard errors, and against the closed-form least
squares fit (numpy's lstsq) far tighter. A model with no hidden layer
(``model=mlp model.hidden=[]``) is linear regression; with ``trainer.l2=0`` its MAP is the
maximum-likelihood fit, whatever σ is (fixed or learned)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.models import build_model
from tests.conftest import compose_cfg
from tests.methods import toy_regression

pytestmark = pytest.mark.statistical

A, B, SIGMA, N = 1.5, -0.5, 0.3, 512


def _fit(noise: str, seed: int):
    """The MAP (kernel, bias, σ) of a linear model on a fresh draw, and the data."""
    cfg = compose_cfg(
        "method=map",
        "model=mlp",
        "model.hidden=[]",
        "likelihood=gaussian",
        f"likelihood.noise={noise}",
        "trainer.l2=0",
        f"trainer.batch_size={N}",  # full batch: the optimum, not a minibatch's jitter
        "trainer.steps=600",
        "trainer.schedule.init_value=0.05",
        "trainer.eval_every=0",
    )
    lik = build(cfg.likelihood, "likelihood")
    data = toy_regression.linear(N, A, B, SIGMA, seed=seed)
    module = build(cfg.model, "model", num_classes=lik.outputs(1))
    model = build_model(module, data.spec, "mlp", 1024, lik)
    post = build(cfg.method, "method").fit(jax.random.key(seed), model, data)
    params = post.params["net"] if noise == "learned" else post.params
    dense = params["Dense_0"]
    sigma = math.exp(float(post.params["log_noise"])) if noise == "learned" else SIGMA
    return float(dense["kernel"][0, 0]), float(dense["bias"][0]), sigma, data


@pytest.mark.parametrize("noise", ["fixed", "learned"])
@pytest.mark.parametrize("seed", [0, 1])
def test_map_recovers_the_line_and_the_noise(noise, seed):
    a, b, sigma, data = _fit(noise, seed)
    x, y = np.asarray(data.train.x[:, 0], np.float64), np.asarray(data.train.y, np.float64)
    n = x.size
    design = np.stack([x, np.ones(n)], axis=1)
    (a_ls, b_ls), rss = np.linalg.lstsq(design, y, rcond=None)[:2]
    sigma_ml = math.sqrt(float(rss[0]) / n)  # the maximum-likelihood σ
    # standard errors of least squares: σ² (XᵀX)⁻¹; of σ̂: σ / √(2n)
    se_a, se_b = np.sqrt(np.diag(np.linalg.inv(design.T @ design))) * SIGMA
    se_sigma = SIGMA / math.sqrt(2 * n)
    # the truth, within 3 standard errors
    assert abs(a - A) < 3 * se_a and abs(b - B) < 3 * se_b, (a, b)
    # the closed-form fit, within a tenth of a standard error (the optimiser converged)
    assert abs(a - a_ls) < 0.1 * se_a and abs(b - b_ls) < 0.1 * se_b, (a - a_ls, b - b_ls)
    if noise == "learned":
        assert abs(sigma - SIGMA) < 3 * se_sigma, sigma
        assert abs(sigma - sigma_ml) < 0.1 * se_sigma, (sigma, sigma_ml)
