"""``dataset.augment=true``: a random crop and a horizontal flip of each training batch.

The standard CIFAR recipe (He et al. 2016, "Deep residual learning", Sec. 4.2; used by
SWAG, deep ensembles and uncertainty-baselines): pad each 32x32 image by 4 pixels of zeros
on every side, take a random 32x32 window of the 40x40 result, and mirror it left-right
with probability 1/2. It runs on the device, on the uint8 minibatch, before
``Spec.preprocess`` (so the padding is black, as torchvision's ``RandomCrop(32,
padding=4)`` before ``ToTensor``).

Only the places that draw training minibatches call ``training_batch`` (the trainer's
scan, ``methods.training.scan_steps``, and the SG-MCMC transition); evaluation, the
Laplace curvature, MC-BatchNorm's statistics and every evaluation set see the stored
images. The key is the step's own key folded with ``AUGMENT_SALT``, so the augmentation
is fixed by the run's seed and independent of the dropout and minibatch draws, and a run
without augmentation draws exactly the keys it drew before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bnn_bench.data.dataset import Split
from bnn_bench.errors import UserError

PAD = 4  # pixels of zero padding on each side before the random crop
AUGMENT_SALT = 0x61756720  # "aug ": the augmentation's key, apart from the step's other draws


def crop_flip(key: jax.Array, x: jax.Array, pad: int = PAD) -> jax.Array:
    """A random crop after zero padding, then a random horizontal flip, per image.

    Image b becomes ``flip_b(P(x_b)[i_b : i_b + H, j_b : j_b + W])``, where ``P`` pads
    ``pad`` zeros on each side of both spatial axes, (i_b, j_b) is uniform on
    {0, ..., 2·pad}², and ``flip_b`` reverses the width axis with probability 1/2.

    Args:
      key: a PRNG key; the same key gives the same crops and flips.
      x: (B, H, W, C) images (any dtype; uint8 in the training loops).
      pad: the padding (and largest shift) in pixels.

    Returns:
      (B, H, W, C), the dtype of ``x``.

    Raises:
      UserError: ``x`` is not a batch of images (B, H, W, C).
    """
    if x.ndim != 4:
        raise UserError(
            f"dataset.augment=true crops and flips images (B, H, W, C); this dataset's "
            f"inputs have shape {tuple(x.shape[1:])}. Set dataset.augment=false."
        )
    b, h, w, c = x.shape
    k_shift, k_flip = jax.random.split(key)
    shifts = jax.random.randint(k_shift, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (b,))
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(image, shift, flip):
        crop = jax.lax.dynamic_slice(image, (shift[0], shift[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, shifts, flips)


def training_batch(
    split: Split, idx: jax.Array, key: jax.Array, augment: bool
) -> tuple[jax.Array, jax.Array]:
    """The minibatch ``split[idx]`` of a training step, cropped and flipped when
    ``augment`` (``Spec.augment``) with ``fold_in(key, AUGMENT_SALT)``.

    Args:
      split: the training split on the device.
      idx: (B,) indices of the minibatch.
      key: the step's key (its dropout key or its minibatch key).
      augment: whether to augment (a Python bool: decided when the step is traced).

    Returns:
      x (B, H, W, C) uint8, y (B,) int32.
    """
    x, y = split.x[idx], split.y[idx]
    if augment:
        x = crop_flip(jax.random.fold_in(key, AUGMENT_SALT), x)
    return x, y
