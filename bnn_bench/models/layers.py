"""A 2-D convolution that stays fast inside ``lax.scan`` on the CPU.

XLA:CPU runs the filter-gradient convolution of a training step 10-30x slower
inside a while loop (every ``lax.scan``) than outside one (jax-ml/jax#12868,
open). All of bnn-bench's loops are scans, so on the CPU backend this layer
computes the convolution as patches times a matrix (im2col), which autodiff
turns into matrix products with no convolution at all. On GPU/TPU it calls
``lax.conv_general_dilated`` (cuDNN). Parameters are laid out as ``nn.Conv``'s
(``kernel`` (kh, kw, C_in / groups, C_out), ``bias``), and the initialisation
is the same, so both paths compute the same function of the same parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = str | Sequence[tuple[int, int]]

# conv2d's path where its caller does not choose one (None: im2col on the CPU backend)
_IM2COL: contextvars.ContextVar[bool | None] = contextvars.ContextVar("im2col", default=None)


@contextlib.contextmanager
def convolutions_as(im2col: bool) -> Iterator[None]:
    """Within: every ``conv2d`` traced computes as im2col (True) or as
    ``lax.conv_general_dilated`` (False) whatever the backend. The dry run on a CPU uses
    it to compile the program an accelerator would run, for its memory estimate."""
    token = _IM2COL.set(im2col)
    try:
        yield
    finally:
        _IM2COL.reset(token)


def _pads(size: int, k: int, s: int) -> tuple[int, int]:
    """'SAME' padding as XLA computes it: output ceil(size / s), extra on the high side."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: Padding = "VALID",
    groups: int = 1,
    im2col: bool | None = None,
) -> jax.Array:
    """NHWC convolution of x (B, H, W, C_in) with kernel (kh, kw, C_in / groups, C_out).

    Args:
      strides: (sh, sw).
      padding: ``VALID``, ``SAME`` or ((top, bottom), (left, right)).
      groups: 1, or C_in with C_out = C_in (depthwise, channel multiplier 1).
      im2col: force the patches path (True) or ``lax.conv_general_dilated`` (False);
        None: ``convolutions_as``'s choice if inside one, else im2col on the CPU backend.
    """
    kh, kw, _, cout = kernel.shape
    cin = x.shape[-1]
    if im2col is None:
        im2col = _IM2COL.get()
    if im2col is None:
        im2col = jax.default_backend() == "cpu"
    if not im2col:
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            tuple(strides),
            padding if isinstance(padding, str) else tuple(padding),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
    if groups != 1 and (groups != cin or cout != cin):
        raise ValueError(f"conv2d: groups must be 1 or C_in with C_out = C_in; got {groups}")
    sh, sw = strides
    if padding == "SAME":
        pads = (_pads(x.shape[1], kh, sh), _pads(x.shape[2], kw, sw))
    elif padding == "VALID":
        pads = ((0, 0), (0, 0))
    else:
        pads = tuple(tuple(p) for p in padding)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    h = (x.shape[1] - kh) // sh + 1
    w = (x.shape[2] - kw) // sw + 1
    if h <= 0 or w <= 0:
        raise ValueError(
            f"conv2d: a {kh}x{kw} kernel does not fit a {x.shape[1]}x{x.shape[2]} input"
        )
    patches = [
        x[:, i : i + (h - 1) * sh + 1 : sh, j : j + (w - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]  # kh*kw of (B, h, w, C_in)
    if groups == 1:
        cols = jnp.concatenate(patches, axis=-1)  # (B, h, w, kh*kw*C_in), (i, j, c) order
        return cols @ kernel.reshape(kh * kw * cin, cout)
    stacked = jnp.stack(patches, axis=-2)  # (B, h, w, kh*kw, C)
    return jnp.einsum("bhwkc,kc->bhwc", stacked, kernel.reshape(kh * kw, cout))


class Conv(nn.Module):
    """``nn.Conv`` for 2-D NHWC inputs, computed by ``conv2d`` (see the module docstring)."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Padding = "SAME"
    feature_group_count: int = 1
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        shape = (kh, kw, x.shape[-1] // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, shape)
        y = conv2d(x, kernel, self.strides, self.padding, self.feature_group_count)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y
