"""``vi``: the ELBO's optimum on Bayesian linear regression is the exact mean-field one;
local reparameterisation and Flipout draw what weight sampling draws."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnn_bench.data import Spec
from bnn_bench.errors import UserError
from bnn_bench.methods.vi import (
    VIState,
    kl_divergence,
    make_elbo_step,
    perturbed_layers,
    perturbed_logits,
    sample_params,
    softplus_inverse,
)
from bnn_bench.models import Model
from bnn_bench.models.layers import Conv
from tests.methods.test_contract import _setup

pytestmark = pytest.mark.statistical


class Linear(nn.Module):
    """Flatten, then one dense layer: f(x) = x W (+ b)."""

    num_classes: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes, use_bias=self.use_bias)(x.reshape((x.shape[0], -1)))


class OneConv(nn.Module):
    """One 2x2 VALID convolution with bias (``layers.Conv`` or flax's), flattened."""

    num_classes: int
    flax_conv: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        layer = nn.Conv if self.flax_conv else Conv
        return layer(self.num_classes, (2, 2), padding="VALID")(x).reshape((x.shape[0], -1))


def _inputs(key, n, shape):
    return jax.random.randint(key, (n, *shape), 0, 256).astype(jnp.uint8)


def _random_q(key, params, scale=0.3):
    k1, k2 = jax.random.split(key)
    mean = jax.tree.map(lambda p: p + jax.random.normal(k1, p.shape), params)
    std = jax.tree.map(lambda p: scale * jax.random.uniform(k2, p.shape, minval=0.5), params)
    return mean, std


def _draws(model, mean, std, x, s, local: bool):
    """(s, N, out): s draws of the outputs, by the training path (local
    reparameterisation / Flipout) or by sampling whole networks (the members' path)."""
    layers = perturbed_layers(model)
    keys = jax.random.split(jax.random.key(7), s)
    if local:
        return jax.jit(jax.vmap(lambda k: perturbed_logits(model, mean, std, x, k, layers)))(keys)
    return jax.jit(jax.vmap(lambda k: model.apply(sample_params(k, mean, std), {}, x)[0]))(keys)


def _assert_moments(draws, mean, var, z=5.0):
    """Empirical mean and variance of draws (s, ...) match (mean, var) within z standard
    errors (Gaussian outputs: the variance's standard error is var √(2 / s))."""
    s = draws.shape[0]
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean), z * np.sqrt(var / s) + 1e-6)
    np.testing.assert_array_less(np.abs(draws.var(0) - var), z * var * np.sqrt(2 / s) + 1e-6)


def _cov(draws, mean, i, j):
    """The empirical covariance of draws[:, i] and draws[:, j] about their exact means."""
    return np.mean((draws[(slice(None), *i)] - mean[i]) * (draws[(slice(None), *j)] - mean[j]))


def test_local_reparameterisation_draws_the_weight_sampled_outputs():
    """A dense layer: the pre-activations have mean x μ_W + μ_b and variance x² σ_W² + σ_b²
    by either path; local reparameterisation draws them independently per example."""
    spec = Spec("toy", (1, 1, 3), 4, tuple("abcd"), (0.5,), (0.25,))
    model = Model(Linear(4), spec, "linear")
    mean, std = _random_q(jax.random.key(0), model.init(jax.random.key(1))[0])
    x = _inputs(jax.random.key(2), 5, spec.shape)
    x = x.at[1].set(x[0])  # one input twice: a shared weight draw correlates the two fully
    h = np.asarray(spec.preprocess(x), np.float64).reshape(5, 3)
    w, b = (np.asarray(mean["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    sw, sb = (np.asarray(std["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    mu, var = h @ w + b, h**2 @ sw**2 + sb**2  # (5, 4)

    assert perturbed_layers(model) == {("Dense_0",)}
    local = np.asarray(_draws(model, mean, std, x, 10_000, local=True), np.float64)
    sampled = np.asarray(_draws(model, mean, std, x, 10_000, local=False), np.float64)
    _assert_moments(local, mu, var)
    _assert_moments(sampled, mu, var)
    # weight sampling correlates the examples through the shared weights; local
    # reparameterisation draws them independently (the variance it saves)
    exact = np.sum(h[0] * h[1] * sw[:, 0] ** 2) + sb[0] ** 2
    se = np.sqrt(var[0, 0] * var[1, 0] / sampled.shape[0])  # of an estimated covariance
    assert abs(exact) > 20 * se
    assert abs(_cov(sampled, mu, (0, 0), (1, 0)) - exact) < 5 * se
    assert abs(_cov(local, mu, (0, 0), (1, 0))) < 5 * se


@pytest.mark.parametrize("flax_conv", [False, True], ids=["layers.Conv", "nn.Conv"])
def test_flipout_draws_the_weight_sampled_outputs(flax_conv):
    """A convolution: each output has the weight-sampled mean and variance, and two
    positions of one example keep the covariance of a shared kernel draw (which a
    per-position local reparameterisation would lose)."""
    spec = Spec("toy", (3, 3, 2), 2, ("a", "b"), (0.5,), (0.25,))
    model = Model(OneConv(2, flax_conv), spec, "conv")
    mean, std = _random_q(jax.random.key(0), model.init(jax.random.key(1))[0])
    x = _inputs(jax.random.key(2), 4, spec.shape)
    x = x.at[0].set(x[0, 0, 0, 0])  # a flat image: all its patches are the same
    h = np.asarray(spec.preprocess(x), np.float64)  # (4, 3, 3, 2)
    layer = next(iter(mean))
    w, b = (np.asarray(mean[layer][k], np.float64) for k in ("kernel", "bias"))
    sw, sb = (np.asarray(std[layer][k], np.float64) for k in ("kernel", "bias"))
    patches = np.stack(
        [h[:, i : i + 2, j : j + 2].reshape(4, -1) for i in range(2) for j in range(2)], 1
    )  # (4, 4 positions, 8): (kh, kw, c) order, as the kernel's reshape
    mu = (patches @ w.reshape(8, 2) + b).reshape(4, -1)  # (N, positions x channels)
    var = (patches**2 @ sw.reshape(8, 2) ** 2 + sb**2).reshape(4, -1)

    local = np.asarray(_draws(model, mean, std, x, 10_000, local=True), np.float64)
    sampled = np.asarray(_draws(model, mean, std, x, 10_000, local=False), np.float64)
    _assert_moments(local, mu, var)
    _assert_moments(sampled, mu, var)
    # positions 0 and 3 of channel 0 in example 0 (flattened index position * 2 + channel)
    exact = np.sum(patches[0, 0] * patches[0, 3] * sw.reshape(8, 2)[:, 0] ** 2) + sb[0] ** 2
    se = np.sqrt(var[0, 0] * var[0, 6] / local.shape[0])
    assert abs(exact) > 20 * se
    for d in (local, sampled):
        assert abs(_cov(d, mu, (0, 0), (0, 6)) - exact) < 5 * se


def test_kl_divergence_closed_form():
    mean = {"a": jnp.array([0.3, -1.0]), "b": {"c": jnp.array([[2.0]])}}
    std = {"a": jnp.array([0.5, 2.0]), "b": {"c": jnp.array([[0.1]])}}
    m = np.array([0.3, -1.0, 2.0])
    sd = np.array([0.5, 2.0, 0.1])
    s = 1.5
    expected = np.sum(np.log(s / sd) + (sd**2 + m**2) / (2 * s**2) - 0.5)
    np.testing.assert_allclose(kl_divergence(mean, std, s), expected, rtol=1e-6)
    np.testing.assert_allclose(kl_divergence({"a": jnp.zeros(3)}, {"a": jnp.full(3, s)}, s), 0.0)
    np.testing.assert_allclose(jax.nn.softplus(softplus_inverse(1e-3)), 1e-3, rtol=1e-4)


def test_elbo_optimum_is_the_exact_mean_field_posterior():
    """Bayesian linear regression y = Φ w + N(0, σ²), prior N(0, s² I): the mean-field
    optimum has the exact posterior mean and variances 1 / diag(Λ), Λ = ΦᵀΦ/σ² + I/s².
    The ELBO is optimised by the method's own step (local reparameterisation through the
    model, KL, Adam), full batch."""
    n, d, noise, s = 40, 3, 0.5, 1.0
    spec = Spec("toy", (1, 1, d), 1, ("y",), (0.5,), (0.3,))
    model = Model(Linear(1, use_bias=False), spec, "linear")
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.randint(k1, (n, 1, 1, 1), 0, 256)
    wiggle = jax.random.randint(k2, (n, 1, 1, d), -60, 60)
    x = jnp.clip(x0 + wiggle, 0, 255).astype(jnp.uint8)  # correlated features
    phi = np.asarray(spec.preprocess(x), np.float64).reshape(n, d)
    y = phi @ np.array([1.0, -0.5, 0.8]) + noise * np.asarray(jax.random.normal(k3, (n,)))
    precision = phi.T @ phi / noise**2 + np.eye(d) / s**2
    post_mean = np.linalg.solve(precision, phi.T @ y / noise**2)
    mf_std = 1.0 / np.sqrt(np.diag(precision))
    # the features are correlated: the mean-field variances are not the marginal ones
    assert np.all(np.sqrt(np.diag(np.linalg.inv(precision))) > 1.3 * mf_std)

    layers = perturbed_layers(model)

    def log_likelihood(mean, std, xb, yb, key):
        f = perturbed_logits(model, mean, std, xb, key, layers)[:, 0]
        ll = -0.5 * ((yb - f) / noise) ** 2 - np.log(noise * np.sqrt(2 * np.pi))
        return ll, jnp.zeros_like(ll)

    steps = 6000
    tx = optax.adam(optax.cosine_decay_schedule(0.05, steps))
    step = make_elbo_step(log_likelihood, tx, n, s, num_train_samples=16, warmup_steps=0)
    mean = {"Dense_0": {"kernel": jnp.zeros((d, 1))}}
    rho = jax.tree.map(lambda m: jnp.full_like(m, softplus_inverse(0.1)), mean)
    state = VIState(mean, rho, tx.init((mean, rho)), jnp.zeros((), jnp.int32))
    xs, ys = jnp.asarray(x), jnp.asarray(y, jnp.float32)

    @jax.jit
    def fit(state):
        keys = jax.random.split(jax.random.key(1), steps)
        return jax.lax.scan(lambda st, k: step(st, xs, ys, k), state, keys)

    state, (loss, *_) = fit(state)
    got_mean = np.asarray(state.mean["Dense_0"]["kernel"])[:, 0]
    got_std = np.asarray(jax.nn.softplus(state.rho["Dense_0"]["kernel"]))[:, 0]
    np.testing.assert_allclose(got_mean, post_mean, atol=0.02 * np.abs(post_mean).max())
    np.testing.assert_allclose(got_std, mf_std, rtol=0.03)
    assert np.isfinite(np.asarray(loss)).all()


def test_kl_warmup_weights_the_kl_linearly():
    """β_t = min(1, (t + 1) / W): with a zero likelihood and a frozen q the loss is
    β_t KL / N."""
    mean, std = {"w": jnp.array([0.5, -1.0])}, {"w": jnp.array([0.2, 0.3])}
    rho = jax.tree.map(softplus_inverse, std)
    tx = optax.sgd(0.0)
    step = make_elbo_step(lambda *a: (jnp.zeros(2), jnp.zeros(2)), tx, 10, 1.0, 1, warmup_steps=4)
    state = VIState(mean, rho, tx.init((mean, rho)), jnp.zeros((), jnp.int32))
    kl = float(kl_divergence(mean, std, 1.0))
    losses = []
    for _ in range(6):
        state, (loss, *_) = step(state, jnp.zeros(2), jnp.zeros(2), jax.random.key(0))
        losses.append(float(loss))
    np.testing.assert_allclose(losses, [kl / 10 * b for b in (0.25, 0.5, 0.75, 1, 1, 1)], rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=lenet", "model.norm=batchnorm"], "batch norm"),
        (["model.dropout_rate=0.2"], "dropout"),
    ],
)
def test_refuses_batch_norm_and_dropout(overrides, message):
    data, model, method = _setup("vi", *overrides)
    with pytest.raises(UserError, match=message):
        method.check(model, data)
    with pytest.raises(UserError, match=message):
        method.fit(jax.random.key(0), model, data)


def test_refuses_trainer_l2():
    with pytest.raises(UserError, match="trainer.l2"):
        _setup("vi", "trainer.l2=1e-4")
