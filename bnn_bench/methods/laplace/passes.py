"""The jitted passes of a Laplace fit over its curvature batches.

The curvature batches are training batches ``train[idx]`` (idx: (nb, B); weights (nb, B),
0 marks padding). Each pass is a host loop over them (or over groups of them) around
one jitted function of ``post``: the summed dense or diagonal curvature, one batch's
Kronecker factors, the curvature-vector product (Lanczos) and the log-likelihood at θ*.
None of them scales by N / n; the caller does.
"""

from __future__ import annotations

import sys
from functools import partial

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from bnn_bench.data import Split
from bnn_bench.methods.laplace import curvature as cv
from bnn_bench.methods.laplace import kfac
from bnn_bench.methods.laplace.posterior import LaplacePosterior

# a progress bar on stderr, shown only on a terminal
progress_bar = partial(tqdm, file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True)


def summed(
    post: LaplacePosterior, train: Split, idx, weights, kind: cv.LossCurvature, dense: bool
) -> jax.Array:
    """The unscaled dense (P, P) curvature or its diagonal (P,), batch by batch."""
    dim = post.theta.shape[0]
    acc = jnp.zeros((dim, dim) if dense else (dim,), jnp.float32)
    desc = f"{'dense' if dense else 'diagonal'} curvature"
    for i in progress_bar(range(idx.shape[0]), desc=desc, unit="batch"):
        acc = accumulate(
            acc, post, train.x[idx[i]], train.y[idx[i]], weights[i], dense=dense, kind=kind
        )
    return acc


@partial(jax.jit, static_argnames=("dense", "kind"))
def accumulate(
    acc: jax.Array,
    post: LaplacePosterior,
    x: jax.Array,
    y: jax.Array,
    weights: jax.Array,
    dense: bool,
    kind: cv.LossCurvature,
) -> jax.Array:
    """acc + the batch's dense (P, P) curvature or its diagonal (P,)."""
    batch_fn = cv.dense_batch if dense else cv.diagonal_batch
    return acc + batch_fn(post.logits_fn, post.theta, x, y, weights, kind, post.likelihood)


@partial(jax.jit, static_argnames=("layers", "kind"))
def kfac_batch(post: LaplacePosterior, x, y, weights, layers: tuple[kfac.Layer, ...], kind):
    """One curvature batch's unnormalised Kronecker factors (``kfac.batch_factors``)."""
    return kfac.batch_factors(
        post.logits_fn, post.theta, x, y, weights, layers, kind, post.likelihood
    )


MV_BATCH = 256  # inputs per jitted curvature-vector product (whole curvature batches)


def batches_mv(
    post: LaplacePosterior,
    xs: jax.Array,
    ys: jax.Array,
    weights: jax.Array,
    v: jax.Array,
    kind: cv.LossCurvature,
) -> jax.Array:
    """Σ over the curvature batches xs (nb, B, ...), ys, weights (nb, B) of the
    curvature-vector product (unscaled), as a host loop over groups of batches: the
    product is linear in the inputs, and inside ``lax.scan`` its transposed convolutions
    ran about ten times slower on CPU."""
    nb, b = ys.shape
    g = max(1, MV_BATCH // b)  # batches per call
    out = jnp.zeros_like(v)
    for i in range(0, nb, g):
        j = min(i + g, nb)
        out = out + _batch_mv(
            post,
            xs[i:j].reshape(-1, *xs.shape[2:]),
            ys[i:j].reshape(-1),
            weights[i:j].reshape(-1),
            v,
            kind,
        )
    return out


@partial(jax.jit, static_argnames=("kind",))
def _batch_mv(
    post: LaplacePosterior,
    x: jax.Array,
    y: jax.Array,
    w: jax.Array,
    v: jax.Array,
    kind: cv.LossCurvature,
) -> jax.Array:
    return cv.curvature_mv(post.logits_fn, post.theta, x, y, w, v, kind, post.likelihood)


def log_likelihood(
    post: LaplacePosterior, train: Split, idx: jax.Array, weights: jax.Array
) -> jax.Array:
    """Σ w_i log p(y_i | x_i, θ*) over the curvature batches (unscaled)."""
    g = max(1, MV_BATCH // idx.shape[1])
    total = jnp.zeros(())
    for i in range(0, idx.shape[0], g):
        rows = idx[i : i + g].reshape(-1)
        total = total + _batch_log_likelihood(
            post, train.x[rows], train.y[rows], weights[i : i + g].reshape(-1)
        )
    return total


@jax.jit
def _batch_log_likelihood(
    post: LaplacePosterior, x: jax.Array, y: jax.Array, w: jax.Array
) -> jax.Array:
    out = post.logits_fn(post.theta, x)
    return jnp.sum(w * post.likelihood.log_lik(out, y))
