"""Laplace for regression through its configs on a non-linear toy (``toy_regression.wave``,
an MLP with a hidden layer): the structures beyond the linear case's Full, with the
Gaussian likelihood's three noises, fit and yield finite members (s, N, 2) = (mean, log σ)
whose spread is the posterior's. The numbers are checked against references in
``test_laplace_regression.py`` (unit) and ``test_blr_acceptance.py`` (statistical)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.likelihoods import Gaussian
from bnn_bench.models import build_model
from bnn_bench.models.mlp import MLP
from tests.conftest import compose_cfg
from tests.methods import toy_regression

pytestmark = pytest.mark.e2e

CASES = {
    # KFAC's output factor is the Gaussian Fisher's root diag(1/σ, √2) on (μ, log σ)
    "kfac-heteroscedastic-val_nll": (
        "heteroscedastic",
        ["method/laplace/structure=kfac"],
    ),
    # Lanczos over every parameter, log_noise included; the evidence with the Gaussian
    "lanczos-learned-marglik": (
        "learned",
        [
            "method/laplace/structure=lanczos",
            "method.structure.rank=8",
            "method/laplace/prior_precision=marglik",
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_laplace_fits_and_yields_gaussian_members(case):
    noise, overrides = CASES[case]
    data = toy_regression.wave(n=128, dims=2)
    lik = Gaussian(noise, 0.3)
    model = build_model(MLP(num_classes=lik.outputs(1), hidden=(8,)), data.spec, "mlp", 100, lik)
    cfg = compose_cfg(
        "method=laplace",
        "trainer.epochs=20",
        "trainer.batch_size=32",
        "trainer.eval_every=0",
        "method.predictive.members=8",
        "method.members_per_chunk=8",
        *overrides,
    )
    method = build(cfg.method, "method")
    post = method.fit(jax.random.key(0), model, data)
    chunks = method.member_log_probs(jax.random.key(1), post, data.test.x)
    members = np.concatenate([np.asarray(c) for c in chunks], 0)
    assert members.shape == (8, data.test.size, 2)
    assert np.isfinite(members).all()
    tau = post.info["laplace/prior_precision"]
    assert 1e-4 <= tau <= 1e6 and np.isfinite(post.info["laplace/log_marglik"])
    # the members differ (the posterior has spread) and sit around the MAP network
    f_map = np.asarray(post.model.likelihood.member(post.logits_fn(post.theta, data.test.x)))
    spread = members[..., 0].std(0)
    assert spread.min() > 0
    assert np.abs(members[..., 0].mean(0) - f_map[:, 0]).max() < 5 * spread.max()
    if noise == "learned":  # log σ is the parameter log_noise, drawn like any weight
        assert members[..., 1].std(0).min() > 0
