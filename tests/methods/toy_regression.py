"""A tiny regression dataset for the methods' tests, built in memory: float features
(N, D), float targets (N,), a spec whose task is ``regression`` and whose preprocessing
is the identity (what issue 20's regression datasets give; tests only)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from bnn_bench.data import Dataset, Spec, Split


@dataclass(frozen=True)
class RegressionSpec(Spec):
    """A spec of D float features and one standardised target."""

    task: str = "regression"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    def preprocess(self, x: jax.Array) -> jax.Array:
        return x.astype(jnp.float32)


def spec(dims: int = 1) -> RegressionSpec:
    """The spec of ``dims`` float features and one target."""
    return RegressionSpec("toy_regression", (dims,), 1, ("y",), (0.0,), (1.0,))


def linear(
    n: int = 256, slope: float = 1.5, intercept: float = -0.5, noise: float = 0.3, seed: int = 0
) -> Dataset:
    """y = slope · x + intercept + noise · ε, x ~ N(0, 1), ε ~ N(0, 1); train n, val and
    test n // 4 each."""
    rng = np.random.default_rng(seed)

    def split(size: int) -> Split:
        x = rng.normal(size=(size, 1)).astype(np.float32)
        y = slope * x[:, 0] + intercept + noise * rng.normal(size=size)
        return Split(jnp.asarray(x), jnp.asarray(y, jnp.float32))

    return Dataset(spec(1), split(n), split(n // 4), split(n // 4), source="in memory")


def wave(n: int = 256, dims: int = 2, seed: int = 0) -> Dataset:
    """y = sin(2 x₁) + 0.5 x₂ + 0.1 ε on D features (a non-linear toy for the contract)."""
    rng = np.random.default_rng(seed)

    def split(size: int) -> Split:
        x = rng.normal(size=(size, dims)).astype(np.float32)
        y = np.sin(2 * x[:, 0]) + 0.5 * x[:, -1] + 0.1 * rng.normal(size=size)
        return Split(jnp.asarray(x), jnp.asarray(y, jnp.float32))

    return Dataset(spec(dims), split(n), split(n // 4), split(n // 4), source="in memory")
