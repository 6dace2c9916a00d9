"""The laplax MNIST tutorial's CNN: three 3x3 VALID convs (32, 32, 64), average pools."""

import flax.linen as nn
import jax

from bnn_bench.models.layers import Conv


class CNN(nn.Module):
    """conv32-relu-avgpool2, conv32-relu-avgpool2, conv64-relu-avgpool3(stride 1), linear;
    dropout after each pooled block when ``dropout_rate > 0``.

    On 28x28 inputs the last feature map is 1x1x64, as in the tutorial. On larger
    inputs it is flattened, so the linear layer grows with the input.

    Attributes:
      num_classes: output size.
      dropout_rate: dropout probability after each conv block (0: none).
    """

    num_classes: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def drop(y):
            if self.dropout_rate == 0:
                return y
            return nn.Dropout(self.dropout_rate, deterministic=not train)(y)

        x = drop(nn.avg_pool(nn.relu(Conv(32, (3, 3), padding="VALID")(x)), (2, 2), (2, 2)))
        x = drop(nn.avg_pool(nn.relu(Conv(32, (3, 3), padding="VALID")(x)), (2, 2), (2, 2)))
        x = drop(nn.avg_pool(nn.relu(Conv(64, (3, 3), padding="VALID")(x)), (3, 3), (1, 1)))
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))
