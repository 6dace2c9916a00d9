"""capsa's MNIST tutorial network ``ConvMod`` (PyTorch's MNIST example net)."""

import flax.linen as nn
import jax


class ConvMod(nn.Module):
    """conv10(5x5)-maxpool2-relu, conv20(5x5)-dropout2d-maxpool2-relu, fc320-50-relu-dropout,
    fc classes. On 28x28 inputs the flattened features are 4·4·20 = 320.

    Attributes:
      num_classes: output size.
      dropout_rate: dropout probability (channel dropout after the second conv, then
        element dropout after fc50), 0.5 as torch's ``Dropout2d``/``F.dropout``.
    """

    num_classes: int
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.max_pool(nn.Conv(10, (5, 5), padding="VALID")(x), (2, 2), (2, 2)))
        x = nn.Conv(20, (5, 5), padding="VALID")(x)
        x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(x)
        x = nn.relu(nn.max_pool(x, (2, 2), (2, 2)))
        x = nn.relu(nn.Dense(50)(x.reshape((x.shape[0], -1))))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)
