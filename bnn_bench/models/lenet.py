"""LeNet as TorchUncertainty's ``lenet``: optional BatchNorm and dropout."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_bench.models.layers import Conv


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, h, w, C) as torch's AdaptiveAvgPool2d (floor/ceil windows)."""
    h_in, w_in = x.shape[1], x.shape[2]

    def windows(n_in, n_out):
        return [(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]

    rows = [
        jnp.stack(
            [x[:, r0:r1, c0:c1].mean(axis=(1, 2)) for c0, c1 in windows(w_in, size[1])], axis=1
        )
        for r0, r1 in windows(h_in, size[0])
    ]
    return jnp.stack(rows, axis=1)


class LeNet(nn.Module):
    """conv6(5x5)-[BN]-relu-maxpool, conv16(5x5)-[BN]-relu-maxpool, adaptive pool 4x4,
    fc120, fc84, fc classes; dropout after each activation when ``dropout_rate > 0``.

    Attributes:
      num_classes: output size.
      norm: ``none`` or ``batchnorm``.
      dropout_rate: dropout probability (channel dropout after convs).
      bn_momentum: running-statistics momentum (PyTorch's 0.1 is flax's 0.9).
    """

    num_classes: int
    norm: str = "none"
    dropout_rate: float = 0.0
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.norm not in ("none", "batchnorm"):
            raise ValueError(f"model.norm must be 'none' or 'batchnorm'; got {self.norm!r}")
        bn = self.norm == "batchnorm"

        def norm(y):
            if not bn:
                return y
            return nn.BatchNorm(
                use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5
            )(y)

        conv_drop = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)
        fc_drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        x = conv_drop(nn.relu(norm(Conv(6, (5, 5), padding="VALID")(x))))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = conv_drop(nn.relu(norm(Conv(16, (5, 5), padding="VALID")(x))))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = adaptive_avg_pool(x, (4, 4)).reshape((x.shape[0], -1))
        x = fc_drop(nn.relu(nn.Dense(120)(x)))
        x = fc_drop(nn.relu(nn.Dense(84)(x)))
        return nn.Dense(self.num_classes)(x)
