"""``laplace``: post-hoc Laplace approximation around a MAP fit (MacKay, 1992; Daxberger+ 2021).

    p(θ | D) ≈ N(θ*, (G + τ I)⁻¹),   G = (N / n) Σ_{i ≤ n} J_iᵀ H_i J_i  (GGN, or empirical Fisher)

θ* is trained with the ``trainer`` group (the same network ``method=map`` trains with
the same seed) or loaded from an earlier run (``init_from``). G comes from
matrix-vector products over ``curvature_batches`` training batches (all of them by
default), scaled to the N training examples as laplax's ``create_ggn_mv(...,
num_total_samples=N)``; its structure is

* ``lanczos``: rank-k eigenpairs by Lanczos (laplax's ``create_posterior_fn("lanczos")``);
  the other directions keep the prior variance 1/τ;
* ``diagonal``: the exact diagonal of G (per-example vector-Jacobian products, not a
  Hutchinson estimate);
* ``last_layer``: G dense over the last layer's parameters, the rest fixed at θ*;
* ``full``: G dense over all parameters (tiny networks and tests).

The prior precision τ is fixed, or ``optimize``d: the maximiser of the Laplace
evidence (``optimize_by=marglik``) or the minimiser of validation NLL on a grid
(``optimize_by=val_nll``). Members are posterior samples pushed through the
linearised network f(x, θ*) + J(x) δ (``linearised``, laplax's ``lin_mc_pred_act``)
or the network itself f(x, θ* + δ) (``weights``), or one member from the probit
approximation softmax(μ / √(1 + π/8 σ²)) (``probit``; MacKay, 1992).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.evaluation.summary import EvalPlan
from bnn_bench.methods import curvature as cv
from bnn_bench.methods.base import LogFn, MemberMethod, no_log
from bnn_bench.methods.map import checkpoint_path, load_point, save_point
from bnn_bench.methods.training import Trainer, epoch_batches
from bnn_bench.models import Model, Params, State, num_params
from bnn_bench.models.base import map_batches

logger = logging.getLogger(__name__)

STRUCTURES = ("lanczos", "diagonal", "last_layer", "full")
PREDICTIVES = ("linearised", "probit", "weights")
OPTIMIZE_BY = ("marglik", "val_nll")
FULL_MAX_PARAMS = 5000  # a dense P x P eigendecomposition beyond this is impractical
_JACOBIAN_FLOATS = 2**24  # per-example Jacobians per probit batch: (b, C, P) <= this


@struct.dataclass
class LaplacePosterior:
    """N(θ*, Σ(τ)) over the flat parameters ``theta`` (all of them, or the last layer's).

    Attributes:
      model: the network.
      params, state: the MAP network (all parameters) and its batch-norm statistics.
      theta: (P,) the MAP values of the parameters the Gaussian is over.
      curvature: G ≈ U diag(s) Uᵀ + diag(d), scaled to the training-set size.
      prior_precision: () τ.
      unravel: flat (P,) -> the parameter pytree ``theta`` came from.
      head: the last layer's key in ``params`` for ``last_layer``, else None.
      info: (name, value) pairs for metrics.json (``extra_metrics``).
    """

    model: Model = struct.field(pytree_node=False)
    params: Params
    state: State
    theta: jax.Array
    curvature: cv.Curvature
    prior_precision: jax.Array
    unravel: Callable = struct.field(pytree_node=False)
    head: str | None = struct.field(pytree_node=False, default=None)
    info: tuple = struct.field(pytree_node=False, default=())

    def logits_fn(self, theta: jax.Array, x: jax.Array) -> jax.Array:
        """Evaluation-mode logits (B, C) of uint8 inputs x with the Gaussian's parameters
        set to ``theta`` (P,) and the others at the MAP."""
        sub = self.unravel(theta)
        params = {**self.params, self.head: sub} if self.head is not None else sub
        return self.model.apply(params, self.state, x)[0]

    def extra_metrics(self) -> dict[str, float]:
        """``laplace/*`` scalars for metrics.json: prior precision, evidence, timings."""
        return dict(self.info)


@dataclass(frozen=True)
class Laplace(MemberMethod):
    """Post-hoc Laplace approximation with a GGN (or empirical Fisher) curvature.

    Attributes:
      trainer: trains the MAP network (ignored with ``init_from``).
      init_from: a run folder whose ``checkpoint/map.msgpack`` holds the MAP network
        (written by every ``map`` and ``laplace`` run); None to train.
      curvature: posterior structure, ``lanczos``, ``diagonal``, ``last_layer`` or ``full``.
      approximation: ``ggn`` (generalised Gauss-Newton) or ``empirical_fisher``.
      rank: Lanczos iterations = rank of the low-rank curvature.
      curvature_batches: training batches the curvature is summed over (scaled to the
        full data size); None for the whole training split.
      curvature_batch_size: inputs per curvature batch.
      prior_precision: τ, a positive number or ``optimize``.
      optimize_by: ``marglik`` (maximise the Laplace evidence) or ``val_nll`` (minimise
        the validation NLL of the predictive on a grid; needs a validation split).
      prior_range: [low, high], the log-uniform range searched by ``optimize``.
      grid_size: points of the ``val_nll`` grid (``marglik`` searches 1001, then refines).
      predictive: ``linearised`` (MC in function space), ``probit`` (closed form, one
        member) or ``weights`` (MC weight samples through the network).
      num_samples: members S of the sampled predictives.
      chunk_size: members per streamed chunk (s, N, C).
    """

    trainer: Trainer
    init_from: str | None = None
    curvature: str = "lanczos"
    approximation: str = "ggn"
    rank: int = 100
    curvature_batches: int | None = 50
    curvature_batch_size: int = 32
    prior_precision: float | str = "optimize"
    optimize_by: str = "val_nll"
    prior_range: tuple[float, float] = (1e-4, 1e6)
    grid_size: int = 21
    predictive: str = "linearised"
    num_samples: int = 30
    chunk_size: int = 10

    def __post_init__(self):
        for name, value, allowed in (
            ("curvature", self.curvature, STRUCTURES),
            ("approximation", self.approximation, cv.APPROXIMATIONS),
            ("predictive", self.predictive, PREDICTIVES),
            ("optimize_by", self.optimize_by, OPTIMIZE_BY),
        ):
            if value not in allowed:
                raise UserError(
                    f"method.{name} must be one of {', '.join(allowed)}; got {value!r}."
                )
        tau = self.prior_precision
        if isinstance(tau, str):
            if tau != "optimize":
                raise UserError(
                    f"method.prior_precision must be a positive number or 'optimize'; got {tau!r}."
                )
        elif not tau > 0:
            raise UserError(f"method.prior_precision must be positive; got {tau}.")
        low, high = (float(v) for v in self.prior_range)
        if not 0 < low < high:
            raise UserError(
                f"method.prior_range must be [low, high] with 0 < low < high; "
                f"got {list(self.prior_range)}."
            )
        if min(
            self.rank, self.curvature_batch_size, self.num_samples, self.chunk_size, self.grid_size
        ) < 1 or (self.curvature_batches is not None and self.curvature_batches < 1):
            raise UserError(
                "method.rank, curvature_batches, curvature_batch_size, num_samples, "
                "chunk_size and grid_size must be >= 1."
            )
        if self.init_from is not None:
            checkpoint_path(self.init_from)  # fails now, before data or training

    # ------------------------------------------------------------------ fit

    def fit(
        self, key: jax.Array, model: Model, data: Dataset, plan: EvalPlan, log: LogFn = no_log
    ) -> LaplacePosterior:
        del plan  # members are produced on demand
        shapes, _ = jax.eval_shape(model.init, key)
        head = list(shapes)[-1] if self.curvature == "last_layer" else None
        dim = num_params(shapes[head] if head is not None else shapes)
        if self.curvature == "full" and dim > FULL_MAX_PARAMS:
            raise UserError(
                f"method.curvature=full needs a dense {dim:,} x {dim:,} matrix; "
                f"it is limited to {FULL_MAX_PARAMS:,} parameters. Use lanczos, "
                f"diagonal or last_layer."
            )
        if (
            self.prior_precision == "optimize"
            and self.optimize_by == "val_nll"
            and data.val is None
        ):
            raise UserError(
                "method.optimize_by=val_nll needs a validation split; set "
                "dataset.val_fraction > 0 or use optimize_by=marglik."
            )

        # --- the MAP network: the same key as `method=map`, so the same network
        tic = time.perf_counter()
        if self.init_from is not None:
            params, state = load_point(self.init_from, model)
            log_line = f"loaded MAP from {checkpoint_path(self.init_from)}"
        else:
            ts = self.trainer.train(key, model, data, log)
            params, state = ts.params, ts.state
            log_line = "trained MAP"
        t_map = time.perf_counter() - tic
        logger.info("%s in %.1fs", log_line, t_map)

        # --- curvature
        tic = time.perf_counter()
        theta, unravel = ravel_pytree(params[head] if head is not None else params)
        post = LaplacePosterior(
            model=model,
            params=params,
            state=state,
            theta=theta,
            curvature=cv.from_diagonal(jnp.zeros_like(theta)),
            prior_precision=jnp.ones(()),
            unravel=unravel,
            head=head,
        )
        idx, weights = self._curvature_batches(jax.random.fold_in(key, 1), data.train.size)
        factor = data.train.size / float(weights.sum())
        curv = self._curvature(jax.random.fold_in(key, 2), post, data.train, idx, weights, factor)
        loglik = factor * float(_log_likelihood(post, data.train, idx, weights))
        post = post.replace(curvature=curv)
        jax.block_until_ready(curv)
        t_curv = time.perf_counter() - tic
        logger.info(
            "%s %s curvature over %d parameters from %d examples (x%.1f) in %.1fs",
            self.curvature,
            self.approximation,
            dim,
            int(weights.sum()),
            factor,
            t_curv,
        )

        # --- prior precision
        tic = time.perf_counter()
        sq = float(jnp.sum(jnp.square(theta)))
        info: dict[str, float] = {}
        if self.prior_precision != "optimize":
            tau = float(self.prior_precision)
        elif self.optimize_by == "marglik":
            tau, _ = cv.maximise_marginal_likelihood(curv, loglik, sq, *self.prior_range)
            if self.curvature == "lanczos":
                # Only k directions carry an Occam factor, while ‖θ*‖² spans all P: the
                # evidence then favours τ near k/‖θ*‖², far too wide for the P − k rest.
                logger.warning(
                    "the evidence of a rank-%d curvature over %d parameters "
                    "tends to pick a too small prior precision; prefer "
                    "optimize_by=val_nll for lanczos.",
                    curv.eigvals.shape[0],
                    dim,
                )
        else:
            tau, info["laplace/val_nll"] = self._tune_on_validation(
                jax.random.fold_in(key, 3), post, data.val
            )
        lml = float(cv.log_marginal_likelihood(curv, tau, loglik, sq))
        t_prior = time.perf_counter() - tic
        logger.info(
            "prior precision %.4g (%s); log marginal likelihood %.1f",
            tau,
            "fixed" if self.prior_precision != "optimize" else f"optimised by {self.optimize_by}",
            lml,
        )
        info |= {
            "laplace/prior_precision": tau,
            "laplace/log_marglik": lml,
            "laplace/num_params": float(dim),
            "laplace/rank": float(curv.eigvals.shape[0]),
            "laplace/curvature_examples": float(weights.sum()),
            "laplace/time_map": t_map,
            "laplace/time_curvature": t_curv,
            "laplace/time_prior": t_prior,
        }
        log({"laplace/prior_precision": tau, "laplace/log_marglik": lml}, 0)
        return post.replace(
            prior_precision=jnp.asarray(tau, jnp.float32), info=tuple(sorted(info.items()))
        )

    def _curvature_batches(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """Indices (nb, B) into the training split and weights (nb, B) (0 marks padding)."""
        b = min(self.curvature_batch_size, n)
        if self.curvature_batches is not None and self.curvature_batches * b < n:
            idx = epoch_batches(key, n, b)[: self.curvature_batches]
            return idx, jnp.ones(idx.shape, jnp.float32)
        nb = -(-n // b)  # the whole split, the last batch padded with weight 0
        perm = jnp.pad(jax.random.permutation(key, n), (0, nb * b - n))
        weights = (jnp.arange(nb * b) < n).astype(jnp.float32)
        return perm.reshape(nb, b), weights.reshape(nb, b)

    def _curvature(
        self, key, post: LaplacePosterior, train: Split, idx, weights, factor: float
    ) -> cv.Curvature:
        nb, dim = idx.shape[0], post.theta.shape[0]
        bar = partial(tqdm, file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True)
        if self.curvature == "lanczos":
            xs, ys = train.x[idx], train.y[idx]  # (nb, B, H, W, C), (nb, B)
            with bar(total=min(self.rank, dim), desc="lanczos", unit="mv") as pbar:
                evals, evecs = cv.lanczos(
                    key,
                    lambda v: factor * _curvature_mv(post, xs, ys, weights, v, self.approximation),
                    dim,
                    self.rank,
                    progress=pbar.update,
                )
            return cv.Curvature(evecs, evals, jnp.zeros(dim, jnp.float32))
        dense = self.curvature in ("full", "last_layer")
        acc = jnp.zeros((dim, dim) if dense else (dim,), jnp.float32)
        for i in bar(range(nb), desc=f"{self.curvature} curvature", unit="batch"):
            acc = _accumulate(
                acc,
                post,
                train.x[idx[i]],
                train.y[idx[i]],
                weights[i],
                dense=dense,
                approximation=self.approximation,
            )
        acc = factor * acc
        return cv.from_dense(acc) if dense else cv.from_diagonal(acc)

    def _tune_on_validation(self, key, post: LaplacePosterior, val: Split) -> tuple[float, float]:
        """The τ of a log-uniform grid whose predictive has the lowest validation NLL."""
        low, high = (math.log(float(v)) for v in self.prior_range)
        grid = np.exp(np.linspace(low, high, self.grid_size))
        nll_fn = self._val_nll_fn(key, post, val)
        nlls = []
        for tau in tqdm(
            grid, desc="prior precision (val NLL)", file=sys.stderr, disable=not sys.stderr.isatty()
        ):
            nlls.append(nll_fn(float(tau)))
            logger.info("prior precision %.4g: val NLL %.4f", tau, nlls[-1])
        best = int(np.nanargmin(nlls))
        if best in (0, len(grid) - 1):
            logger.warning(
                "the best prior precision %.4g is at the end of method.prior_range; "
                "widen the range if the optimum lies beyond it.",
                grid[best],
            )
        return float(grid[best]), float(nlls[best])

    def _val_nll_fn(self, key, post: LaplacePosterior, val: Split) -> Callable[[float], float]:
        """τ -> validation NLL of this method's predictive (members drawn with ``key``)."""
        if self.predictive == "linearised" and not bool(jnp.any(post.curvature.diag)):
            ids = jnp.arange(self.num_samples)
            z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), post.theta.shape))(
                ids
            )  # (S, P)
            terms = _function_space_terms(post, val.x, z, batch_size=post.model.batch_size)
            uz = z @ post.curvature.basis  # (S, k)
            return lambda tau: float(
                _linearised_nll(
                    terms, uz, post.curvature.eigvals, jnp.asarray(tau, jnp.float32), val.y
                )
            )

        def nll(tau):
            p = post.replace(prior_precision=jnp.asarray(tau, jnp.float32))
            probs = sum(c.sum(0) for c in self.members(key, p, val.x))
            return M.nll(probs / (self.num_samples if self.predictive != "probit" else 1), val.y)

        return nll

    # ------------------------------------------------------------------ members

    def members(
        self, key: jax.Array, posterior: LaplacePosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        """Probabilities (s, N, C) of members. Member s uses the deviation
        δ_s = Σ^{1/2} z_s, z_s ~ N(0, I) from ``fold_in(key, s)``, whatever x is."""
        batch = posterior.model.batch_size
        if self.predictive == "probit":
            c = posterior.model.spec.num_classes
            b = max(1, min(batch, _JACOBIAN_FLOATS // (c * posterior.theta.shape[0])))
            yield _probit_probs(posterior, x, batch_size=b)[None]  # (1, N, C)
            return
        for start in range(0, self.num_samples, self.chunk_size):
            ids = jnp.arange(start, min(start + self.chunk_size, self.num_samples))
            yield _sampled_probs(
                posterior, x, key, ids, batch_size=batch, linearised=self.predictive == "linearised"
            )  # (s, N, C)

    def save(self, out_dir: Path, posterior: LaplacePosterior) -> Path:
        """Writes the MAP network, so a later run can reuse it with ``init_from``."""
        return save_point(out_dir, posterior.params, posterior.state)


# ---------------------------------------------------------------------- jitted pieces


@partial(jax.jit, static_argnames=("batch_size", "linearised"))
def _sampled_probs(
    post: LaplacePosterior,
    x: jax.Array,
    key: jax.Array,
    ids: jax.Array,
    batch_size: int,
    linearised: bool,
) -> jax.Array:
    """(s, N, C) member probabilities for the members ``ids``."""
    z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), post.theta.shape))(
        ids
    )  # (s, P)
    logits = sampled_logits(post, x, z, batch_size=batch_size, linearised=linearised)
    return jax.nn.softmax(logits, axis=-1)


@partial(jax.jit, static_argnames=("batch_size", "linearised"))
def sampled_logits(
    post: LaplacePosterior,
    x: jax.Array,
    z: jax.Array,
    batch_size: int = 1000,
    linearised: bool = True,
) -> jax.Array:
    """Logits (s, N, C) of the members with deviations δ = Σ^{1/2} z.

    Args:
      post: the posterior.
      x: (N, H, W, C) uint8 inputs.
      z: (s, P) standard normal draws.
      linearised: f(x, θ*) + J(x) δ (a sample of the function-space Gaussian
        N(f(x, θ*), J Σ Jᵀ)) if true, else f(x, θ* + δ).
    """
    deltas = cv.sample(post.curvature, post.prior_precision, z)  # (s, P)

    def batch_fn(xb):
        if linearised:
            logits, jvp_fn = jax.linearize(lambda t: post.logits_fn(t, xb), post.theta)
            out = logits + jax.lax.map(jvp_fn, deltas)  # (s, b, C)
        else:
            out = jax.lax.map(lambda d: post.logits_fn(post.theta + d, xb), deltas)
        return jnp.swapaxes(out, 0, 1)  # (b, s, C)

    return jnp.swapaxes(map_batches(batch_fn, x, batch_size), 0, 1)  # (s, N, C)


@partial(jax.jit, static_argnames=("batch_size",))
def _function_space_terms(
    post: LaplacePosterior, x: jax.Array, z: jax.Array, batch_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """f (N, C), J U (N, C, k) and J z (N, s, C) at θ*: with d = 0 the linearised members
    are f + J U (a(τ) ⊙ Uᵀz) + J z / √τ, a(τ) = 1/√(s+τ) − 1/√τ, so a τ grid needs
    one pass of k + s tangents instead of one pass per grid point."""

    def batch_fn(xb):
        logits, jvp_fn = jax.linearize(lambda t: post.logits_fn(t, xb), post.theta)
        ju = jax.lax.map(jvp_fn, post.curvature.basis.T)  # (k, b, C)
        jz = jax.lax.map(jvp_fn, z)  # (s, b, C)
        return logits, jnp.moveaxis(ju, 0, -1), jnp.swapaxes(jz, 0, 1)

    return map_batches(batch_fn, x, batch_size)


@jax.jit
def _linearised_nll(
    terms, uz: jax.Array, eigvals: jax.Array, tau: jax.Array, y: jax.Array
) -> jax.Array:
    """NLL of the linearised MC predictive at τ from ``_function_space_terms``."""
    f, ju, jz = terms
    a = jax.lax.rsqrt(eigvals + tau) - jax.lax.rsqrt(tau)  # (k,)
    logits = f[:, None] + jnp.einsum("nck,sk->nsc", ju, a * uz) + jz * jax.lax.rsqrt(tau)
    probs = jax.nn.softmax(logits, -1).mean(1)  # (N, C)
    return M.nll(probs, y, xp=jnp)


@partial(jax.jit, static_argnames=("batch_size",))
def _probit_probs(post: LaplacePosterior, x: jax.Array, batch_size: int) -> jax.Array:
    """(N, C) softmax(μ / √(1 + π/8 σ²)), σ² = diag(J Σ Jᵀ) of the linearised logits."""

    def batch_fn(xb):
        logits = post.logits_fn(post.theta, xb)
        jac = jax.vmap(lambda xi: jax.jacrev(lambda t: post.logits_fn(t, xi[None])[0])(post.theta))(
            xb
        )  # (b, C, P)
        var = cv.function_variance(post.curvature, post.prior_precision, jac)
        return jax.nn.softmax(logits * jax.lax.rsqrt(1.0 + math.pi / 8 * var), axis=-1)

    return map_batches(batch_fn, x, batch_size)


@partial(jax.jit, static_argnames=("dense", "approximation"))
def _accumulate(
    acc: jax.Array,
    post: LaplacePosterior,
    x: jax.Array,
    y: jax.Array,
    weights: jax.Array,
    dense: bool,
    approximation: str,
) -> jax.Array:
    """acc + the batch's dense (P, P) curvature or its diagonal (P,)."""
    batch_fn = cv.dense_batch if dense else cv.diagonal_batch
    return acc + batch_fn(post.logits_fn, post.theta, x, y, weights, approximation)


_MV_BATCH = 256  # inputs per jitted curvature-vector product (whole curvature batches)


def _curvature_mv(
    post: LaplacePosterior,
    xs: jax.Array,
    ys: jax.Array,
    weights: jax.Array,
    v: jax.Array,
    approximation: str,
) -> jax.Array:
    """Σ over the curvature batches xs (nb, B, ...), ys, weights (nb, B) of the
    curvature-vector product (unscaled), as a host loop over groups of batches: the
    product is linear in the inputs, and inside ``lax.scan`` its transposed convolutions
    ran about ten times slower on CPU."""
    nb, b = ys.shape
    g = max(1, _MV_BATCH // b)  # batches per call
    out = jnp.zeros_like(v)
    for i in range(0, nb, g):
        j = min(i + g, nb)
        out = out + _batch_mv(
            post,
            xs[i:j].reshape(-1, *xs.shape[2:]),
            ys[i:j].reshape(-1),
            weights[i:j].reshape(-1),
            v,
            approximation,
        )
    return out


@partial(jax.jit, static_argnames=("approximation",))
def _batch_mv(
    post: LaplacePosterior,
    x: jax.Array,
    y: jax.Array,
    w: jax.Array,
    v: jax.Array,
    approximation: str,
) -> jax.Array:
    return cv.curvature_mv(post.logits_fn, post.theta, x, y, w, v, approximation)


def _log_likelihood(
    post: LaplacePosterior, train: Split, idx: jax.Array, weights: jax.Array
) -> jax.Array:
    """Σ w_i log p(y_i | x_i, θ*) over the curvature batches (unscaled)."""
    g = max(1, _MV_BATCH // idx.shape[1])
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
    logp = jax.nn.log_softmax(post.logits_fn(post.theta, x), axis=-1)
    return jnp.sum(w * jnp.take_along_axis(logp, y[:, None], -1)[:, 0])
