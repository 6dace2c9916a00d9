"""MobileNetV1 (Howard et al., 2017) as haiku's ``hk.nets.MobileNetV1``, plus a width multiplier.

The JaxSGMC CIFAR-10 tutorial samples this network without batch norm
(``use_bn=False``) on 112x112 inputs.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_bench.models.layers import Conv

_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
_CHANNELS = (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)


class MobileNetV1(nn.Module):
    """A 3x3 stride-2 VALID conv (32 channels), 13 depthwise-separable blocks, global
    mean pool, linear. Without batch norm the convolutions carry biases (as haiku).

    Attributes:
      num_classes: output size.
      width_multiplier: scales every channel count (1.0 is haiku's network).
      use_bn: batch norm after every convolution (decay 0.999, as haiku).
      strides, channels: per block, as haiku's defaults.
    """

    num_classes: int
    width_multiplier: float = 1.0
    use_bn: bool = True
    strides: Sequence[int] = _STRIDES
    channels: Sequence[int] = _CHANNELS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if len(self.strides) != len(self.channels):
            raise ValueError("model.strides and model.channels must have the same length")
        if self.width_multiplier <= 0:
            raise ValueError(f"model.width_multiplier must be > 0; got {self.width_multiplier}")

        def width(c):
            return max(8, int(round(c * self.width_multiplier)))

        def norm_relu(y):
            if self.use_bn:
                y = nn.BatchNorm(use_running_average=not train, momentum=0.999, epsilon=1e-5)(y)
            return nn.relu(y)

        bias = not self.use_bn
        x = norm_relu(Conv(width(32), (3, 3), (2, 2), padding="VALID", use_bias=bias)(x))
        for c, s in zip(self.channels, self.strides, strict=True):
            x = Conv(
                x.shape[-1],
                (3, 3),
                (s, s),
                padding=((1, 1), (1, 1)),
                feature_group_count=x.shape[-1],
                use_bias=bias,
            )(x)  # depthwise
            x = norm_relu(x)
            x = norm_relu(Conv(width(c), (1, 1), padding="VALID", use_bias=bias)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)
