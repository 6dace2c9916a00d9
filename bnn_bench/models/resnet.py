"""CIFAR residual networks: ResNet-20-FRN, ResNet-20 (BatchNorm) and WideResNet.

``ResNetFRN`` is the model of Izmailov et al. 2021 ("What are Bayesian neural network
posteriors really like?", google-research ``bnn_hmc``) and of the NeurIPS 2021 BDL
competition's reference (``jax_models.py``, ``resnet20_frn_swish``): He et al.'s
ResNet-v1 for CIFAR with each batch norm replaced by Filter Response Normalization and
its TLU, and swish activations. It keeps no batch statistics, so every sampler can use
it. ``ResNet`` is the same network with BatchNorm and ReLU (``bnn_hmc``'s
``make_resnet20_fn``). ``WideResNet`` is uncertainty-baselines' ``wide_resnet``
(version 2, pre-activation, Zagoruyko & Komodakis 2016).

The references end in an 8x8 average pool, which on 32x32 inputs is the mean over the
final 8x8 feature map; here that mean is taken over whatever map there is, so the same
networks (and parameter counts) also take 28x28 inputs (7x7 final maps).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_bench.models.layers import Conv

# Keras' and haiku's 'he_normal': truncated normal, variance 2 / fan_in.
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class FilterResponseNorm(nn.Module):
    """Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan
    2020, eqs. 1-2): ``nu2 = mean_{h,w} x^2``, ``y = gamma * x / sqrt(nu2 + eps) + beta``,
    ``z = max(y, tau)``; per-channel gamma, beta, tau. No batch statistics: each input
    is normalised over its own spatial positions.

    Attributes:
      epsilon: the reference's 1e-6.
    """

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        c = x.shape[-1]
        tau = self.param("tau", nn.initializers.zeros, (c,))
        beta = self.param("beta", nn.initializers.zeros, (c,))
        gamma = self.param("gamma", nn.initializers.ones, (c,))
        nu2 = jnp.mean(jnp.square(x), axis=(1, 2), keepdims=True)
        x = x * jax.lax.rsqrt(nu2 + self.epsilon)
        return jnp.maximum(gamma * x + beta, tau)


def _check_depth(depth: int, k: int, what: str) -> int:
    if depth < k + 6 or (depth - k) % 6 != 0:
        raise ValueError(f"model.depth must be 6n+{k} ({what}); got {depth}")
    return (depth - k) // 6


def _resnet_v1(
    x: jax.Array,
    depth: int,
    width: int,
    num_classes: int,
    norm: Callable[[], Callable[[jax.Array], jax.Array]],
    act: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """The CIFAR ResNet-v1 of ``bnn_hmc``/Keras (He et al. 2016, sec. 4.2, with 1x1
    projection shortcuts where the shape changes): conv-norm-act, three stacks of
    (depth - 2) / 6 blocks at width, 2 width, 4 width; global mean; linear.
    Called inside a compact ``__call__``; layers are created in the reference's order."""
    blocks = _check_depth(depth, 2, "e.g. 20, 32, 44")

    def layer(y, filters, kernel=3, strides=1, activation=lambda v: v):
        y = Conv(filters, (kernel, kernel), (strides, strides), "SAME", kernel_init=he_normal)(y)
        return activation(norm()(y))

    x = layer(x, width, activation=act)
    filters = width
    for stack in range(3):
        for block in range(blocks):
            strides = 2 if stack > 0 and block == 0 else 1
            y = layer(x, filters, strides=strides, activation=act)
            y = layer(y, filters)
            if strides == 2:  # projection shortcut to the new shape
                x = layer(x, filters, kernel=1, strides=strides)
            x = act(x + y)
        filters *= 2
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(num_classes, kernel_init=he_normal)(x)


class ResNetFRN(nn.Module):
    """ResNet-v1 with FRN + TLU and swish: ResNet-20-FRN at depth 20, width 16.

    Attributes:
      num_classes: output size.
      depth: 6n+2 layers (20: three blocks per stack).
      width: filters of the first stack (16; doubled per stack).
    """

    num_classes: int
    depth: int = 20
    width: int = 16

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: (B, H, W, C) preprocessed images -> (B, num_classes) logits."""
        del train  # no batch statistics, no dropout
        return _resnet_v1(x, self.depth, self.width, self.num_classes, FilterResponseNorm, nn.swish)


class ResNet(nn.Module):
    """ResNet-v1 with BatchNorm and ReLU: the usual CIFAR ResNet-20 at depth 20, width 16.

    Attributes:
      num_classes: output size.
      depth: 6n+2 layers.
      width: filters of the first stack.
      bn_momentum: running-statistics momentum (the reference's decay 0.9).
    """

    num_classes: int
    depth: int = 20
    width: int = 16
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: (B, H, W, C) preprocessed images -> (B, num_classes) logits."""

        def norm():
            return nn.BatchNorm(
                use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5
            )

        return _resnet_v1(x, self.depth, self.width, self.num_classes, norm, nn.relu)


class WideResNet(nn.Module):
    """WRN-depth-width as uncertainty-baselines' ``wide_resnet(version=2)``: a 3x3 conv
    (16), three groups of (depth - 4) / 6 pre-activation blocks (BN-ReLU-conv-BN-ReLU-conv,
    1x1 projection of the block's input where the shape changes) at 16, 32, 64 x width
    filters, BN-ReLU, global mean, linear. Convolutions have no bias.

    Attributes:
      num_classes: output size.
      depth: 6n+4 convolutional layers ("n" in WRN-n-k).
      width: the width multiplier ("k").
      dropout_rate: dropout between a block's two convolutions (Zagoruyko & Komodakis'
        variant; uncertainty-baselines uses 0).
      bn_momentum: running-statistics momentum (the reference's 0.9).
    """

    num_classes: int
    depth: int = 28
    width: int = 10
    dropout_rate: float = 0.0
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: (B, H, W, C) preprocessed images -> (B, num_classes) logits."""
        blocks = _check_depth(self.depth, 4, "e.g. 16, 22, 28, 40")

        def bn_relu(y):
            bn = nn.BatchNorm(
                use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5
            )
            return nn.relu(bn(y))

        def conv(y, filters, kernel=3, strides=1):
            s = (strides, strides)
            return Conv(
                filters, (kernel, kernel), s, "SAME", use_bias=False, kernel_init=he_normal
            )(y)

        x = conv(x, 16)
        for group, filters in enumerate((16, 32, 64)):
            filters *= self.width
            for block in range(blocks):
                strides = 2 if group > 0 and block == 0 else 1
                y = conv(bn_relu(x), filters, strides=strides)
                if self.dropout_rate > 0:
                    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
                y = conv(bn_relu(y), filters)
                if x.shape != y.shape:  # projection shortcut of the raw input, as the reference
                    x = conv(x, filters, kernel=1, strides=strides)
                x = x + y
        x = jnp.mean(bn_relu(x), axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=he_normal)(x)
