"""Distribution shift: corruptions of uint8 test images, applied on the device.

Each corruption takes uint8 images (N, H, W, C) and an intensity ``level`` where
0 leaves the images unchanged, and returns uint8 images of the same shape:

- ``rotate``: rotation by ``level`` degrees counter-clockwise about the centre,
  bilinear, black outside the image (rotated MNIST, Ovadia et al., 2019).
- ``gaussian_noise``: additive noise of standard deviation ``level`` on the
  [0, 1] pixel scale, clipped (as ImageNet-C's, Hendrycks & Dietterich, 2019).
- ``contrast``: ``x' = m + (1 - level)(x - m)`` with m each image's mean: 1 is flat grey.
- ``invert``: ``x' = (1 - level) x + level (255 - x)``: 1 is the negative image.

Every evaluation set ``shift/<corruption>/<level>`` is the test set so corrupted.

On clusters the same loop takes CIFAR-10-C (Hendrycks & Dietterich, 2019) from TFDS:
``cifar10c_<name>`` with severities 1..5 reads the prepared
``cifar10_corrupted/<name>_<severity>`` test split instead of corrupting on the device.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bnn_bench.errors import UserError


def _to_uint8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def rotate(key: jax.Array, x: jax.Array, level: float) -> jax.Array:
    """Rotates every image by ``level`` degrees counter-clockwise (bilinear, black fill)."""
    del key
    _, h, w, _ = x.shape
    theta = math.radians(level)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    # Inverse map: the output pixel (y, x) reads the input at the point turned back
    # by -theta. Rows grow downwards, which flips the signs of the usual matrix.
    dy, dx = yy - cy, xx - cx
    src_y = cy + math.cos(theta) * dy + math.sin(theta) * dx
    src_x = cx - math.sin(theta) * dy + math.cos(theta) * dx
    y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
    xf = x.astype(jnp.float32)
    out = jnp.zeros_like(xf)
    for oy in (0, 1):
        for ox in (0, 1):
            iy, ix = y0 + oy, x0 + ox
            weight = (1 - jnp.abs(src_y - iy)) * (1 - jnp.abs(src_x - ix))  # (H, W)
            inside = (iy >= 0) & (iy <= h - 1) & (ix >= 0) & (ix <= w - 1)
            iy_c = jnp.clip(iy, 0, h - 1).astype(jnp.int32)
            ix_c = jnp.clip(ix, 0, w - 1).astype(jnp.int32)
            out = out + jnp.where(inside, weight, 0.0)[None, :, :, None] * xf[:, iy_c, ix_c, :]
    return _to_uint8(out)


def gaussian_noise(key: jax.Array, x: jax.Array, level: float) -> jax.Array:
    """Adds N(0, (255 · level)^2) noise to every pixel."""
    noise = jax.random.normal(key, x.shape, jnp.float32) * (255.0 * level)
    return _to_uint8(x.astype(jnp.float32) + noise)


def contrast(key: jax.Array, x: jax.Array, level: float) -> jax.Array:
    """Pulls every image towards its mean grey by the share ``level``."""
    del key
    xf = x.astype(jnp.float32)
    mean = xf.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8(mean + (1.0 - level) * (xf - mean))


def invert(key: jax.Array, x: jax.Array, level: float) -> jax.Array:
    """Blends every image with its negative: ``level`` = 1 is the full inversion."""
    del key
    xf = x.astype(jnp.float32)
    return _to_uint8((1.0 - level) * xf + level * (255.0 - xf))


CORRUPTIONS = {
    "rotate": rotate,
    "gaussian_noise": gaussian_noise,
    "contrast": contrast,
    "invert": invert,
}

# Default intensities, each starting just above the clean level 0.
DEFAULT_LEVELS = {
    "rotate": (15, 30, 45, 60, 75, 90, 105, 120, 135, 150, 165, 180),  # degrees
    "gaussian_noise": (0.05, 0.1, 0.2, 0.3, 0.5),  # std on the [0, 1] scale
    "contrast": (0.25, 0.5, 0.75, 0.9, 0.95),  # share of contrast removed
    "invert": (0.25, 0.5, 0.75, 1.0),  # blend with the negative
}


def level_name(level: float) -> str:
    """``30.0`` -> ``"30"``, ``0.25`` -> ``"0.25"``: the level as it appears in set names."""
    return f"{float(level):g}"


def corrupt(
    key: jax.Array, x: jax.Array, corruption: str, level: float, batch_size: int = 2048
) -> jax.Array:
    """``CORRUPTIONS[corruption]`` applied to x (N, H, W, C) uint8, ``batch_size`` at a
    time so the float copies stay small; the noise key is folded with the batch index."""
    fn = jax.jit(CORRUPTIONS[corruption], static_argnums=2)
    parts = [
        fn(jax.random.fold_in(key, i), x[start : start + batch_size], float(level))
        for i, start in enumerate(range(0, x.shape[0], batch_size))
    ]
    return jnp.concatenate(parts) if parts else x


# --- CIFAR-10-C from TFDS

TFDS_PREFIX = "cifar10c_"
CIFAR10_C = (
    "brightness",
    "contrast",
    "defocus_blur",
    "elastic",
    "fog",
    "frost",
    "frosted_glass_blur",
    "gaussian_blur",
    "gaussian_noise",
    "impulse_noise",
    "jpeg_compression",
    "motion_blur",
    "pixelate",
    "saturate",
    "shot_noise",
    "snow",
    "spatter",
    "speckle_noise",
    "zoom_blur",
)
CIFAR10_C_LEVELS = (1, 2, 3, 4, 5)


def is_tfds(corruption: str) -> bool:
    return corruption.startswith(TFDS_PREFIX)


def load_cifar10_corrupted(
    corruption: str, severity: int, data_dir: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 test images of ``cifar10_corrupted/<name>_<severity>`` (uint8, labels).

    Raises:
      UserError: when the name is unknown, or the data is not prepared and
        ``download`` is off (or fails without network).
    """
    name = corruption[len(TFDS_PREFIX) :]
    if name not in CIFAR10_C or int(severity) not in CIFAR10_C_LEVELS:
        raise UserError(
            f"eval.shift: {corruption!r} at severity {severity} is not in CIFAR-10-C; "
            f"names: {', '.join(CIFAR10_C)}; severities 1..5."
        )
    config = f"cifar10_corrupted/{name}_{int(severity)}"
    root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
    hint = (
        f"Prepare it with `tfds build {config} --data_dir=DIR` on a machine with network, "
        f"copy DIR here and pass eval.tfds_data_dir=DIR"
        + ("." if download else ", or set eval.download=true (about 2.9 GB).")
    )
    if not download and not (root.expanduser() / "cifar10_corrupted").is_dir():
        raise UserError(f"{config} is not in the TFDS data dir {root}. {hint}")
    from bnn_bench.data import sources

    try:  # fails within seconds without network, and leaves no empty folders
        builder = sources.tfds_builder(config, data_dir, download)
    except sources.DataNotFound as e:
        raise UserError(f"{config}: {e}. {hint}") from None
    except sources.DownloadFailed as e:
        raise UserError(f"could not download {config}: {e}. {hint}") from None
    import tensorflow_datasets as tfds

    x, y = tfds.as_numpy(builder.as_dataset(split="test", batch_size=-1, as_supervised=True))
    return np.asarray(x, np.uint8), np.asarray(y, np.int32)
