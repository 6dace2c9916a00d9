"""Multi-layer perceptron (the BlackJAX SGLD/SGHMC tutorial's 784-500-10 by default)."""

from collections.abc import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """Flatten, then ``hidden`` dense ReLU layers, then a linear layer to the classes;
    dropout after each hidden activation when ``dropout_rate > 0``.

    Attributes:
      num_classes: output size.
      hidden: widths of the hidden layers.
      dropout_rate: dropout probability after each hidden layer (0: none).
    """

    num_classes: int
    hidden: Sequence[int] = (500,)
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)
