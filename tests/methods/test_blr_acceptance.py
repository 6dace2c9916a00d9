"""Issue 20's acceptance: on Bayesian linear regression (a network without hidden layer,
``model=mlp model.hidden=[]``, ``likelihood=gaussian``) HMC, Laplace and VI match the
closed-form posterior predictive within Monte Carlo error.

The model f(x) = wᵀx + b with prior N(0, α⁻¹ I) on θ = [b; w] and noise σ² has the
posterior N(μ, Σ), Σ = (α I + X̃ᵀX̃/σ²)⁻¹, μ = Σ X̃ᵀy/σ², X̃ = [1, X], and the predictive
N(x̃ᵀμ, x̃ᵀΣx̃ + σ²) at x̃ = [1; x]. Each method runs through its public entry points
(``build`` of its config, ``fit``, ``member_log_probs``); its S members yield (mean, log σ)
per input, and their equal-weight mixture has mean m̄ = mean_s m_s and variance
var_s(m_s) + σ² (log σ is the fixed noise's in every member).

The design X has centred orthogonal columns (X̃ᵀX̃ = N I), so Σ is diagonal: the
mean-field family of VI holds the exact posterior, and its optimum is exact too.

Tolerance, from the Monte Carlo error alone. Members drawn independently from the exact
posterior (Laplace, VI) give m_s ~ N(x̃ᵀμ, v), v = x̃ᵀΣx̃, so

    z = (m̄ − x̃ᵀμ) / √(v / S) ~ N(0, 1),   (S − 1) var_s(m_s) / v ~ χ²(S − 1).

HMC's members are correlated within a chain: S becomes the effective sample size of
the member means at that input (``diagnostics.bulk_ess``, capped at S), the χ² an
approximation. With T test inputs the 2T tests share a false-failure probability of
``P_FAIL`` (Bonferroni): each is two-sided at level P_FAIL / (2T). The MAP that Laplace
centres on comes from its trainer (full batch, ``trainer.l2 = α/N``, so its minimiser is
μ exactly); its optimisation error is not Monte Carlo error, and is checked apart to be
far below it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bnn_bench.config import build
from bnn_bench.data import Dataset, Split
from bnn_bench.evaluation.diagnostics import bulk_ess
from bnn_bench.likelihoods import Gaussian
from bnn_bench.models import build_model
from tests.conftest import compose_cfg
from tests.methods import toy_regression

pytestmark = pytest.mark.statistical

N, D = 20, 2
ALPHA, SIGMA = 1.0, 0.5  # prior N(0, α⁻¹ I) = prior_scale 1; noise σ
X_TEST = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, -2.0], [3.0, 3.0], [-4.0, 1.0]], np.float32)
P_FAIL = 1e-3  # false-failure probability of one method's 2T tests together
S = 2000  # members of Laplace and VI (HMC: 4 chains x 500)


def _data() -> Dataset:
    """N inputs with centred orthogonal columns of norm √N, y = xᵀw + b + σ ε."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    q, _ = np.linalg.qr(x - x.mean(0))
    x = (q * np.sqrt(N)).astype(np.float32)
    y = (x @ np.array([0.8, -0.5]) + 0.3 + SIGMA * rng.normal(size=N)).astype(np.float32)
    test = Split(jnp.asarray(X_TEST), jnp.zeros(len(X_TEST), jnp.float32))
    return Dataset(toy_regression.spec(D), Split(jnp.asarray(x), jnp.asarray(y)), test)


def _closed_form(data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The predictive mean x̃ᵀμ (T,) and the function variance x̃ᵀΣx̃ (T,) at X_TEST."""
    design = lambda x: np.concatenate([np.ones((len(x), 1)), np.asarray(x, np.float64)], 1)
    xt, xs = design(data.train.x), design(X_TEST)
    cov = np.linalg.inv(ALPHA * np.eye(D + 1) + xt.T @ xt / SIGMA**2)
    mu = cov @ xt.T @ np.asarray(data.train.y, np.float64) / SIGMA**2
    return xs @ mu, np.einsum("tp,pq,tq->t", xs, cov, xs)


def _model(data: Dataset):
    """``model=mlp model.hidden=[] likelihood=gaussian``, built as a run builds it."""
    cfg = compose_cfg(
        "model=mlp", "model.hidden=[]", "likelihood=gaussian", f"likelihood.sigma={SIGMA}"
    )
    lik = build(cfg.likelihood, "likelihood")
    assert lik == Gaussian("fixed", SIGMA)
    module = build(cfg.model, "model", num_classes=lik.outputs(data.spec.num_classes))
    return build_model(module, data.spec, "mlp", 100, lik)


FULL_BATCH = [f"trainer.batch_size={N}", "trainer.eval_every=0"]
METHODS = {
    # the MAP of α: l2 = α / N on the mean NLL; Full is exact for a linear model
    "laplace": [
        "method=laplace",
        "method/laplace/structure=full",
        f"method.prior_precision={ALPHA}",
        f"method.predictive.members={S}",
        "method.members_per_chunk=500",
        f"trainer.l2={ALPHA / N}",
        # gradient descent: the mean loss has Hessian I/σ² + l2 here, so a rate of 0.2
        # contracts the error by 0.19 per step
        "trainer/optimizer=sgd",
        "trainer.optimizer.momentum=null",
        "trainer.schedule=0.2",
        "trainer.epochs=100",
        *FULL_BATCH,
    ],
    "hmc": [
        "method=hmc",
        f"method.prior_scale={ALPHA**-0.5}",
        "method.num_chains=4",
        "method.burn_in=200",
        "method.members_per_chain=500",
        "method.save_samples=true",
        "method.chunk_size=100",
    ],
    "vi": [
        "method=vi",
        f"method.prior_scale={ALPHA**-0.5}",
        f"method.members={S}",
        "method.members_per_chunk=500",
        "method.init_std=0.05",
        "method.num_train_samples=4",
        "trainer.schedule.init_value=0.01",
        "trainer.batch_size=5",
        "trainer.epochs=500",
        "trainer.eval_every=0",
    ],
}


def _members(name: str):
    """(S, T, 2) members of method ``name`` at X_TEST, its posterior, the data."""
    data = _data()
    method = build(compose_cfg(*METHODS[name]).method, "method")
    post = method.fit(jax.random.key(0), _model(data), data)
    chunks = method.member_log_probs(jax.random.key(1), post, jnp.asarray(X_TEST))
    return np.concatenate([np.asarray(c, np.float64) for c in chunks], 0), post, data


def _within_mc_error(name: str, means: np.ndarray, ess: np.ndarray, data: Dataset) -> None:
    """Both tests of the module docstring at every test input; prints the numbers."""
    want_mean, want_var = _closed_form(data)
    level = P_FAIL / (2 * len(X_TEST))  # Bonferroni over 2T two-sided tests
    z_max = stats.norm.isf(level / 2)
    got_mean, got_var = means.mean(0), means.var(0, ddof=1)
    z = (got_mean - want_mean) / np.sqrt(want_var / ess)
    lo = stats.chi2.ppf(level / 2, ess - 1) / (ess - 1)
    hi = stats.chi2.isf(level / 2, ess - 1) / (ess - 1)
    ratio = got_var / want_var
    for t in range(len(X_TEST)):
        print(
            f"{name} x={X_TEST[t].tolist()}: mean {got_mean[t]:.4f} (exact {want_mean[t]:.4f}, "
            f"z {z[t]:+.2f}), var f {got_var[t]:.5f} (exact {want_var[t]:.5f}, ratio "
            f"{ratio[t]:.3f} in [{lo[t]:.3f}, {hi[t]:.3f}]), predictive var "
            f"{got_var[t] + SIGMA**2:.5f} (exact {want_var[t] + SIGMA**2:.5f}), ESS {ess[t]:.0f}"
        )
    assert np.all(np.abs(z) < z_max), (z, z_max)
    assert np.all((lo < ratio) & (ratio < hi)), (ratio, lo, hi)


@pytest.mark.parametrize("name", ["laplace", "vi"])
def test_independent_members_match_the_closed_form_predictive(name):
    members, post, data = _members(name)
    assert members.shape == (S, len(X_TEST), 2)
    np.testing.assert_allclose(members[..., 1], np.log(SIGMA), rtol=1e-6)  # fixed noise
    if name == "laplace":  # the trained MAP sits on μ, far inside the MC error
        want_mean, want_var = _closed_form(data)
        f_map = np.asarray(post.logits_fn(post.theta, jnp.asarray(X_TEST))[:, 0], np.float64)
        assert np.all(np.abs(f_map - want_mean) < 0.1 * np.sqrt(want_var / S))
    ess = np.full(len(X_TEST), float(S))
    _within_mc_error(name, members[..., 0], ess, data)
    # the tolerance has power: the same members with Σ inflated by 1.2 (sd x 1.1) fail
    means = members[..., 0]
    inflated = means.mean(0) + np.sqrt(1.2) * (means - means.mean(0))
    with pytest.raises(AssertionError):
        _within_mc_error(f"{name} (Σ x 1.2)", inflated, ess, data)


def test_hmc_matches_the_closed_form_predictive():
    members, _, data = _members("hmc")
    chains = 4
    assert members.shape[0] == chains * 500
    np.testing.assert_allclose(members[..., 1], np.log(SIGMA), rtol=1e-6)
    means = members[..., 0]
    # members are ordered (draw, chain): as (chains, draws, T) for the ESS
    per_chain = means.reshape(-1, chains, len(X_TEST)).transpose(1, 0, 2)
    ess = np.minimum(np.asarray(bulk_ess(per_chain), np.float64), means.shape[0])
    _within_mc_error("hmc", means, ess, data)
