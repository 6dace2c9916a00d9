"""Multi-layer perceptron (the BlackJAX SGLD/SGHMC tutorial's 784-500-10 by default)."""

from collections.abc import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """Flatten, then ``hidden`` dense ReLU layers, then a linear layer to the classes.

    Attributes:
      num_classes: output size.
      hidden: widths of the hidden layers.
    """

    num_classes: int
    hidden: Sequence[int] = (500,)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)
