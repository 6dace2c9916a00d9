"""The im2col convolution equals XLA's convolution, values and gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.models.layers import Conv, conv2d

pytestmark = pytest.mark.unit

CASES = [  # (kernel, strides, padding, groups, C_in, C_out)
    ((3, 3), (1, 1), "VALID", 1, 1, 8),
    ((5, 5), (1, 1), "VALID", 1, 3, 4),
    ((3, 3), (2, 2), "VALID", 1, 3, 5),
    ((3, 3), (2, 2), "SAME", 1, 2, 3),
    ((1, 1), (1, 1), "VALID", 1, 6, 7),
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 6, 6, 6),  # depthwise, as MobileNet's blocks
    ((3, 3), (1, 1), ((1, 1), (1, 1)), 4, 4, 4),
]


@pytest.mark.parametrize("kernel,strides,padding,groups,cin,cout", CASES)
def test_im2col_matches_xla_convolution(kernel, strides, padding, groups, cin, cout):
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 11, 9, cin))
    k = jax.random.normal(kk, (*kernel, cin // groups, cout))

    def loss(k, x, im2col):
        return jnp.sum(jnp.sin(conv2d(x, k, strides, padding, groups, im2col=im2col)))

    ours = conv2d(x, k, strides, padding, groups, im2col=True)
    ref = conv2d(x, k, strides, padding, groups, im2col=False)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    g_ours = jax.grad(loss, argnums=(0, 1))(k, x, True)
    g_ref = jax.grad(loss, argnums=(0, 1))(k, x, False)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_conv_module_initialises_and_computes_like_flax_conv():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    ours, ref = Conv(4, (3, 3), padding="VALID"), nn.Conv(4, (3, 3), padding="VALID")
    p_ours, p_ref = ours.init(jax.random.key(2), x), ref.init(jax.random.key(2), x)
    np.testing.assert_array_equal(p_ours["params"]["kernel"], p_ref["params"]["kernel"])
    np.testing.assert_allclose(ours.apply(p_ours, x), ref.apply(p_ref, x), rtol=1e-5, atol=1e-5)
