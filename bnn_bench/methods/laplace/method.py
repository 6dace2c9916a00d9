"""``laplace``: post-hoc Laplace approximation around a MAP fit (MacKay, 1992; Daxberger+ 2021).

    p(θ | D) ≈ N(θ*, (G + τ I)⁻¹),   G = (N / n) Σ_{i ≤ n} J_iᵀ H_i J_i  (GGN, or empirical Fisher)

θ* is trained with the ``trainer`` group (the same network ``method=map`` trains with
the same seed) or loaded from an earlier run (``init_from``). G comes from
matrix-vector products over ``curvature_batches`` training batches (all of them by
default), scaled to the N training examples as laplax's ``create_ggn_mv(...,
num_total_samples=N)``. Each choice is an object, chosen by a config group under
``conf/method/laplace/``:

* ``structure``: ``lanczos`` (rank-k eigenpairs; laplax's ``create_posterior_fn
  ("lanczos")``), ``diagonal`` (the exact diagonal), ``last_layer`` (dense over the
  last layer), ``full`` (dense over all parameters) or ``kfac`` (one eigendecomposed
  Kronecker block per layer, ``kfac.py``; all layers or the last);
* ``curvature``: ``ggn`` or ``empirical_fisher`` (``curvature.py``);
* ``prior_precision``: ``val_nll`` (the validation-NLL minimiser on a grid),
  ``marglik`` (the maximiser of the Laplace evidence) or ``fixed`` (or a number);
* ``predictive``: ``linearised`` (f(x, θ*) + J(x) δ; laplax's ``lin_mc_pred_act``),
  ``weights`` (f(x, θ* + δ)) or ``probit`` (one member, softmax(μ / √(1 + π/8 σ²));
  MacKay, 1992).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize_scalar
from tqdm.auto import tqdm

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.methods.laplace import curvature as cv
from bnn_bench.methods.laplace import kfac
from bnn_bench.methods.base import Method, RunContext, Work
from bnn_bench.methods.map import checkpoint_path, load_point, map_metrics, save_point
from bnn_bench.methods.training import Trainer, epoch_batches
from bnn_bench.models import Model, Params, State, module_calls, num_params
from bnn_bench.models.base import map_batches

logger = logging.getLogger(__name__)

FULL_MAX_PARAMS = 5000  # a dense P x P eigendecomposition beyond this is impractical
_JACOBIAN_FLOATS = 2**24  # per-example Jacobians per probit batch: (b, C, P) <= this
REFINE_XATOL = 0.01  # val_nll's refinement: log τ to 0.01, τ to about 1%
_bar = partial(tqdm, file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True)


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
      info: ``laplace/*`` numbers for metrics.json: prior precision, evidence, timings.
    """

    model: Model = struct.field(pytree_node=False)
    params: Params
    state: State
    theta: jax.Array
    curvature: cv.AnyCurvature
    prior_precision: jax.Array
    unravel: Callable = struct.field(pytree_node=False)
    head: str | None = struct.field(pytree_node=False, default=None)
    info: dict[str, float] = struct.field(default_factory=dict)

    @classmethod
    def at_map(
        cls, model: Model, params: Params, state: State, head: str | None
    ) -> LaplacePosterior:
        """The posterior before its curvature is known: centred at the MAP ``params``
        (over the ``head`` layer's parameters, or all), curvature 0, τ = 1."""
        theta, unravel = ravel_pytree(params[head] if head is not None else params)
        return cls(
            model=model,
            params=params,
            state=state,
            theta=theta,
            curvature=cv.from_diagonal(jnp.zeros_like(theta)),
            prior_precision=jnp.ones(()),
            unravel=unravel,
            head=head,
        )

    def logits_fn(self, theta: jax.Array, x: jax.Array) -> jax.Array:
        """Evaluation-mode logits (B, C) of uint8 inputs x with the Gaussian's parameters
        set to ``theta`` (P,) and the others at the MAP."""
        sub = self.unravel(theta)
        params = {**self.params, self.head: sub} if self.head is not None else sub
        return self.model.apply(params, self.state, x)[0]


# ---------------------------------------------------------------------- structure
# Which parameters the Gaussian covers and the form of its curvature:
# ``method/laplace/structure=lanczos|diagonal|last_layer|full|kfac``.


class Structure:
    """The form of G: ``head`` picks the parameters, ``fit`` builds G from the curvature
    batches."""

    def head(self, model: Model) -> str | None:
        """The key in ``params`` the Gaussian is over, or None for all parameters."""
        del model
        return None

    def check(self, model: Model, head: str | None, dim: int) -> None:
        """Refuses a model, or ``dim`` parameters under ``head``, the structure cannot
        hold (before training)."""
        del model, head, dim

    def covers(self, model: Model) -> tuple[str | None, int]:
        """The layer the Gaussian covers (``head``; None: every parameter) and its
        parameter count, after ``check`` (shapes only, no compute)."""
        shapes, _ = jax.eval_shape(model.init, jax.random.key(0))
        head = self.head(model)
        dim = num_params(shapes[head] if head is not None else shapes)
        self.check(model, head, dim)
        return head, dim

    def fit(
        self,
        key: jax.Array,
        post: LaplacePosterior,
        train: Split,
        idx: jax.Array,
        weights: jax.Array,
        factor: float,
        kind: cv.LossCurvature,
    ) -> cv.AnyCurvature:
        """G over the batches ``train[idx]`` (weights mask padding), times ``factor``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Lanczos(Structure):
    """Rank-k eigenpairs of G by Lanczos (laplax's ``create_posterior_fn("lanczos")``); the
    other directions keep the prior variance 1/τ.

    Attributes:
      rank: Lanczos iterations k = the rank of the curvature.
    """

    rank: int = 100

    def __post_init__(self):
        if self.rank < 1:
            raise UserError(f"method.structure.rank must be >= 1; got {self.rank}.")

    def fit(self, key, post, train, idx, weights, factor, kind):
        dim = post.theta.shape[0]
        xs, ys = train.x[idx], train.y[idx]  # (nb, B, H, W, C), (nb, B)
        with _bar(total=min(self.rank, dim), desc="lanczos", unit="mv") as pbar:
            evals, evecs = cv.lanczos(
                key,
                lambda v: factor * _curvature_mv(post, xs, ys, weights, v, kind),
                dim,
                self.rank,
                progress=pbar.update,
            )
        return cv.Curvature(evecs, evals, jnp.zeros(dim, jnp.float32))


@dataclass(frozen=True)
class Diagonal(Structure):
    """The exact diagonal of G (per-example vector-Jacobian products, not a Hutchinson
    estimate)."""

    def fit(self, key, post, train, idx, weights, factor, kind):
        del key
        return cv.from_diagonal(factor * _summed(post, train, idx, weights, kind, dense=False))


@dataclass(frozen=True)
class Full(Structure):
    """G dense over all parameters (tiny networks and tests)."""

    def check(self, model: Model, head: str | None, dim: int) -> None:
        if dim > FULL_MAX_PARAMS:
            raise UserError(
                f"method/laplace/structure=full needs a dense {dim:,} x {dim:,} matrix; "
                f"it is limited to {FULL_MAX_PARAMS:,} parameters. Use "
                f"method/laplace/structure=lanczos, diagonal or last_layer."
            )

    def fit(self, key, post, train, idx, weights, factor, kind):
        del key
        return cv.from_dense(factor * _summed(post, train, idx, weights, kind, dense=True))


@dataclass(frozen=True)
class LastLayer(Full):
    """G dense over the last layer's parameters; the rest stay at θ*."""

    def head(self, model: Model) -> str | None:
        return last_layer(model)

    def check(self, model: Model, head: str | None, dim: int) -> None:
        del model, head, dim  # a last layer is small


@dataclass(frozen=True)
class KFAC(Structure):
    """Kronecker-factored G, one block A ⊗ B per dense or convolution layer (Martens &
    Grosse, 2015; Ritter et al., 2018; KFC for convolutions), each factor
    eigendecomposed, so every τ costs no refactorisation (``methods/kfac.py``).

    Attributes:
      subset: ``all`` (every layer; a model with other parameters, e.g. batch norm, is
        refused) or ``last_layer`` (the last layer's block; the rest stay at θ*).
      separate_bias: False: one joint block per layer, the bias a ones entry of the input
        factor (Martens & Grosse, 2015; exact for one input). True: a weight block
        A_w ⊗ B and a bias block B per layer, as laplace-torch builds them.
    """

    subset: Literal["all", "last_layer"] = "all"
    separate_bias: bool = False

    def __post_init__(self):
        if self.subset not in ("all", "last_layer"):
            raise UserError(
                f"method.structure.subset must be all or last_layer; got {self.subset!r}."
            )
        if not isinstance(self.separate_bias, bool):
            raise UserError(
                f"method.structure.separate_bias must be true or false; got {self.separate_bias!r}."
            )

    def head(self, model: Model) -> str | None:
        return last_layer(model) if self.subset == "last_layer" else None

    def check(self, model: Model, head: str | None, dim: int) -> None:
        kfac.find_layers(model, head)

    def fit(self, key, post, train, idx, weights, factor, kind):
        del key
        prefix = (post.head,) if post.head is not None else ()
        layers = kfac.find_layers(post.model, post.head)
        sums = None
        for i in _bar(range(idx.shape[0]), desc="kfac factors", unit="batch"):
            batch = _kfac_batch(post, train.x[idx[i]], train.y[idx[i]], weights[i], layers, kind)
            sums = batch if sums is None else jax.tree.map(jnp.add, sums, batch)
        return kfac.kronecker(
            sums, layers, prefix, float(weights.sum()), factor, post.unravel, self.separate_bias
        )


def _summed(post, train: Split, idx, weights, kind: cv.LossCurvature, dense: bool) -> jax.Array:
    """The unscaled dense (P, P) curvature or its diagonal (P,), batch by batch."""
    dim = post.theta.shape[0]
    acc = jnp.zeros((dim, dim) if dense else (dim,), jnp.float32)
    desc = f"{'dense' if dense else 'diagonal'} curvature"
    for i in _bar(range(idx.shape[0]), desc=desc, unit="batch"):
        acc = _accumulate(
            acc, post, train.x[idx[i]], train.y[idx[i]], weights[i], dense=dense, kind=kind
        )
    return acc


# ---------------------------------------------------------------------- predictive
# How members are drawn: ``method/laplace/predictive=linearised|weights|probit``.


class Predictive:
    """Members of the Laplace posterior: ``members`` streams their probabilities."""

    size: int  # members S

    def members(
        self, key: jax.Array, post: LaplacePosterior, x: jax.Array, chunk_size: int
    ) -> Iterator[jax.Array]:
        """Log-probabilities (s, N, C) of chunks of members."""
        raise NotImplementedError

    def nll_fn(
        self, key: jax.Array, post: LaplacePosterior, val: Split, chunk_size: int
    ) -> Callable[[float], float]:
        """τ -> validation NLL of this predictive (members drawn with ``key``)."""

        def nll(tau):
            p = post.replace(prior_precision=jnp.asarray(tau, jnp.float32))
            probs = sum(jnp.exp(c).sum(0) for c in self.members(key, p, val.x, chunk_size))
            return M.nll(probs / self.size, val.y)

        return nll


@dataclass(frozen=True)
class _Sampled(Predictive):
    num_samples: int = 30

    def __post_init__(self):
        if self.num_samples < 1:
            raise UserError(f"method.predictive.num_samples must be >= 1; got {self.num_samples}.")

    @property
    def size(self) -> int:
        return self.num_samples

    linearised = True

    def members(self, key, post, x, chunk_size):
        """Member s uses the deviation δ_s = Σ^{1/2} z_s, z_s ~ N(0, I) from
        ``fold_in(key, s)``, whatever x is."""
        for start in range(0, self.num_samples, chunk_size):
            ids = jnp.arange(start, min(start + chunk_size, self.num_samples))
            yield _sampled_probs(
                post, x, key, ids, batch_size=post.model.batch_size, linearised=self.linearised
            )  # (s, N, C)


@dataclass(frozen=True)
class Linearised(_Sampled):
    """Monte Carlo in function space: members f(x, θ*) + J(x) δ (laplax's
    ``lin_mc_pred_act``).

    Attributes:
      num_samples: members S.
    """

    def nll_fn(self, key, post, val, chunk_size):
        if not post.curvature.low_rank:
            return super().nll_fn(key, post, val, chunk_size)
        # d = 0: one pass of k + S tangents serves every τ of a grid
        ids = jnp.arange(self.num_samples)
        z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), post.theta.shape))(
            ids
        )  # (S, P)
        terms = _function_space_terms(post, val.x, z, batch_size=post.model.batch_size)
        uz = z @ post.curvature.basis  # (S, k)
        return lambda tau: float(
            _linearised_nll(terms, uz, post.curvature.eigvals, jnp.asarray(tau, jnp.float32), val.y)
        )


@dataclass(frozen=True)
class WeightSpace(_Sampled):
    """Monte Carlo in weight space: members are the network itself, f(x, θ* + δ).

    Attributes:
      num_samples: members S.
    """

    linearised = False


@dataclass(frozen=True)
class Probit(Predictive):
    """One member from the probit approximation softmax(μ / √(1 + π/8 σ²)) of the
    linearised predictive (MacKay, 1992)."""

    size = 1

    def members(self, key, post, x, chunk_size):
        del key, chunk_size
        c = post.model.spec.num_classes
        b = max(1, min(post.model.batch_size, _JACOBIAN_FLOATS // (c * post.theta.shape[0])))
        yield _probit_probs(post, x, batch_size=b)[None]  # (1, N, C)


# ---------------------------------------------------------------------- prior precision
# How τ is chosen: ``method/laplace/prior_precision=val_nll|marglik|fixed`` (or a number).


class PriorPrecision:
    """Chooses τ once the curvature is known."""

    def check(self, data: Dataset) -> None:
        """Refuses data this choice cannot work with (before training)."""
        del data

    def choose(
        self,
        key: jax.Array,
        post: LaplacePosterior,
        loglik: float,
        sq: float,
        val: Split | None,
        predictive: Predictive,
        chunk_size: int,
    ) -> tuple[float, dict[str, float]]:
        """τ and the numbers measured on the way (for metrics.json)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Fixed(PriorPrecision):
    """A given τ (``method.prior_precision=<a number>`` is the same).

    Attributes:
      value: τ > 0.
    """

    value: float = 1.0

    def __post_init__(self):
        if not self.value > 0:
            raise UserError(f"method.prior_precision must be positive; got {self.value}.")

    def choose(self, key, post, loglik, sq, val, predictive, chunk_size):
        return float(self.value), {}

    def __str__(self) -> str:
        return "fixed"


def _check_range(prior_range) -> tuple[float, float]:
    low, high = (float(v) for v in prior_range)
    if not 0 < low < high:
        raise UserError(
            f"method.prior_precision.prior_range must be [low, high] with 0 < low < high; "
            f"got {list(prior_range)}."
        )
    return low, high


@dataclass(frozen=True)
class ValNLL(PriorPrecision):
    """The τ with the lowest validation NLL of the predictive: the best point of a
    log-uniform grid, then refined between that point's two grid neighbours by Brent's
    bounded method on log τ (to ``REFINE_XATOL``), since a coarse grid alone lands on a
    grid point (21 points over 10 decades are a factor 3.2 apart). Every τ reuses the
    same members (same key), so the NLL is a smooth function of τ.

    Attributes:
      grid_size: points of the grid.
      prior_range: [low, high], the range of the grid (and of the refinement).
    """

    grid_size: int = 21
    prior_range: tuple[float, float] = (1e-4, 1e6)

    def __post_init__(self):
        _check_range(self.prior_range)
        if self.grid_size < 1:
            raise UserError(f"method.prior_precision.grid_size must be >= 1; got {self.grid_size}.")

    def check(self, data: Dataset) -> None:
        if data.val is None:
            raise UserError(
                "method/laplace/prior_precision=val_nll needs a validation split; set "
                "dataset.val_fraction=0.1 or use method/laplace/prior_precision=marglik."
            )

    def choose(self, key, post, loglik, sq, val, predictive, chunk_size):
        low, high = (math.log(v) for v in _check_range(self.prior_range))
        log_grid = np.linspace(low, high, self.grid_size)
        nll_fn = predictive.nll_fn(key, post, val, chunk_size)
        nlls = []
        for tau in _bar(np.exp(log_grid), desc="prior precision (val NLL)"):
            nlls.append(float(nll_fn(float(tau))))
            logger.info("prior precision %.4g: val NLL %.4f", tau, nlls[-1])
        best = int(np.nanargmin(nlls))
        if best in (0, len(log_grid) - 1):
            logger.warning(
                "the best prior precision %.4g is at the end of "
                "method.prior_precision.prior_range; widen the range if the optimum lies "
                "beyond it.",
                math.exp(log_grid[best]),
            )
        log_tau, nll = float(log_grid[best]), nlls[best]
        if len(log_grid) > 1:
            lo, hi = log_grid[max(best - 1, 0)], log_grid[min(best + 1, len(log_grid) - 1)]
            res = minimize_scalar(
                lambda u: float(nll_fn(math.exp(u))),
                bounds=(float(lo), float(hi)),
                method="bounded",
                options={"xatol": REFINE_XATOL},
            )
            if res.fun < nll:  # the refinement may only improve on the grid
                log_tau, nll = float(res.x), float(res.fun)
            logger.info(
                "prior precision refined to %.4g: val NLL %.4f (%d evaluations)",
                math.exp(log_tau),
                nll,
                res.nfev,
            )
        return math.exp(log_tau), {"laplace/val_nll": nll}

    def __str__(self) -> str:
        return "optimised by val_nll"


@dataclass(frozen=True)
class MargLik(PriorPrecision):
    """The maximiser of the Laplace evidence log p(D | τ).

    Attributes:
      prior_range: [low, high], the range searched (1001 log-uniform points, then refined).
    """

    prior_range: tuple[float, float] = (1e-4, 1e6)

    def __post_init__(self):
        _check_range(self.prior_range)

    def choose(self, key, post, loglik, sq, val, predictive, chunk_size):
        curv = post.curvature
        tau, _ = cv.maximise_marginal_likelihood(curv, loglik, sq, *self.prior_range)
        rank, dim = curv.rank, post.theta.shape[0]
        if curv.low_rank and rank < dim:
            # Only k directions carry an Occam factor, while ‖θ*‖² spans all P: the
            # evidence then favours τ near k/‖θ*‖², far too wide for the P − k rest.
            logger.warning(
                "the evidence of a rank-%d curvature over %d parameters tends to pick a "
                "too small prior precision; prefer method/laplace/prior_precision=val_nll "
                "for lanczos.",
                rank,
                dim,
            )
        return tau, {}

    def __str__(self) -> str:
        return "optimised by marglik"


# ---------------------------------------------------------------------- the method


@dataclass(frozen=True)
class Laplace(Method):
    """Post-hoc Laplace approximation with a GGN (or empirical Fisher) curvature.

    Attributes:
      trainer: trains the MAP network (ignored with ``init_from``).
      init_from: a run folder whose ``checkpoint/map.msgpack`` holds the MAP network
        (written by every ``map`` and ``laplace`` run); None to train.
      structure: the form of G: ``Lanczos``, ``Diagonal``, ``LastLayer``, ``Full`` or
        ``KFAC``.
      curvature: the loss curvature: ``GGN`` or ``EmpiricalFisher``.
      prior_precision: how τ is chosen: ``ValNLL``, ``MargLik``, ``Fixed``, or a number.
      predictive: how members are drawn: ``Linearised``, ``WeightSpace`` or ``Probit``.
      curvature_batches: training batches the curvature is summed over (scaled to the
        full data size); None for the whole training split.
      curvature_batch_size: inputs per curvature batch.
      chunk_size: members per streamed chunk (s, N, C).
    """

    trainer: Trainer
    init_from: str | None = None
    structure: Structure = field(default_factory=Lanczos)
    curvature: cv.LossCurvature = field(default_factory=cv.GGN)
    prior_precision: PriorPrecision | float = field(default_factory=ValNLL)
    predictive: Predictive = field(default_factory=Linearised)
    curvature_batches: int | None = 50
    curvature_batch_size: int = 32
    chunk_size: int = 10

    def __post_init__(self):
        tau = self.prior_precision
        if isinstance(tau, int | float) and not isinstance(tau, bool):
            object.__setattr__(self, "prior_precision", Fixed(float(tau)))
        for name, kind in (
            ("structure", Structure),
            ("curvature", cv.GGN | cv.EmpiricalFisher),
            ("prior_precision", PriorPrecision),
            ("predictive", Predictive),
        ):
            if not isinstance(getattr(self, name), kind):
                raise UserError(
                    f"method.{name} must be a choice of method/laplace/{name} "
                    f"(conf/method/laplace/{name}/); got {getattr(self, name)!r}."
                )
        if min(self.curvature_batch_size, self.chunk_size) < 1 or (
            self.curvature_batches is not None and self.curvature_batches < 1
        ):
            raise UserError(
                "method.curvature_batches, curvature_batch_size and chunk_size must be >= 1."
            )
        if self.init_from is not None:
            checkpoint_path(self.init_from)  # fails now, before data or training

    # ------------------------------------------------------------------ fit

    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> LaplacePosterior:
        ctx = ctx or RunContext()
        head, dim = self.structure.covers(model)
        self.prior_precision.check(data)

        # --- the MAP network: the same key as `method=map`, so the same network
        tic = time.perf_counter()
        if self.init_from is not None:
            params, state = load_point(self.init_from, model)
            log_line = f"loaded MAP from {checkpoint_path(self.init_from)}"
        else:
            ts = self.trainer.train(key, model, data, ctx)
            params, state = ts.params, ts.state
            log_line = "trained MAP"
        t_map = time.perf_counter() - tic
        logger.info("%s in %.1fs", log_line, t_map)

        # --- curvature
        tic = time.perf_counter()
        post = LaplacePosterior.at_map(model, params, state, head)
        idx, weights = self._curvature_batches(jax.random.fold_in(key, 1), data.train.size)
        factor = data.train.size / float(weights.sum())
        curv = self.structure.fit(
            jax.random.fold_in(key, 2), post, data.train, idx, weights, factor, self.curvature
        )
        loglik = factor * float(_log_likelihood(post, data.train, idx, weights))
        post = post.replace(curvature=curv)
        jax.block_until_ready(curv)
        t_curv = time.perf_counter() - tic
        logger.info(
            "%s %s curvature over %d parameters from %d examples (x%.1f) in %.1fs",
            type(self.structure).__name__,
            type(self.curvature).__name__,
            dim,
            int(weights.sum()),
            factor,
            t_curv,
        )

        # --- prior precision
        tic = time.perf_counter()
        sq = float(jnp.sum(jnp.square(post.theta)))
        tau, info = self.prior_precision.choose(
            jax.random.fold_in(key, 3), post, loglik, sq, data.val, self.predictive, self.chunk_size
        )
        lml = float(cv.log_marginal_likelihood(curv, tau, loglik, sq))
        t_prior = time.perf_counter() - tic
        logger.info(
            "prior precision %.4g (%s); log marginal likelihood %.1f",
            tau,
            self.prior_precision,
            lml,
        )
        info |= {
            "laplace/prior_precision": tau,
            "laplace/log_marglik": lml,
            "laplace/num_params": float(dim),
            "laplace/rank": float(curv.rank),
            "laplace/curvature_examples": float(weights.sum()),
            "laplace/time_map": t_map,
            "laplace/time_curvature": t_curv,
            "laplace/time_prior": t_prior,
        }
        ctx.log({"laplace/prior_precision": tau, "laplace/log_marglik": lml}, 0)
        ctx.count(samples=self.predictive.size)
        return post.replace(prior_precision=jnp.asarray(tau, jnp.float32), info=info)

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

    # ------------------------------------------------------------------ members

    def members(
        self, key: jax.Array, posterior: LaplacePosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        """Probabilities (s, N, C) of chunks of the predictive's members."""
        return self.predictive.members(key, posterior, x, self.chunk_size)

    def save(self, out_dir: Path, posterior: LaplacePosterior) -> Path:
        """Writes the MAP network, so a later run can reuse it with ``init_from``."""
        return save_point(out_dir, posterior.params, posterior.state)

    def report(
        self, key: jax.Array, posterior: LaplacePosterior, sets: dict[str, Split], num_bins: int
    ) -> dict[str, float]:
        """The MAP network's own metrics, ``map/<set>/{acc,nll,ece,brier}``."""
        del key
        return map_metrics(posterior.model, posterior.params, posterior.state, sets, num_bins)

    def check(self, model: Model, data: Dataset) -> None:
        """Refuses a structure ``fit`` would refuse (e.g. ``full`` over more than
        ``FULL_MAX_PARAMS`` parameters, ``kfac`` on a depthwise convolution)."""
        super().check(model, data)
        self.structure.covers(model)

    def plan(self, model: Model, data: Dataset) -> Work:
        """Steps and gradient evaluations of the MAP network (0 with ``init_from``),
        members (1 for the probit predictive), batch, networks.

        For ``dry_run``: counts the work of ``fit`` without doing it (``data`` may
        hold shapes only), and refuses a structure ``fit`` would refuse (e.g. ``full``
        over more than ``FULL_MAX_PARAMS`` parameters)."""
        steps = 0 if self.init_from else self.trainer.num_steps(data.train.size)
        return Work(
            steps=steps,
            grad_evals=steps,
            members=self.predictive.size,
            batch_size=self.trainer.batch_size,
            networks=1,
        )


# ---------------------------------------------------------------------- jitted pieces


def last_layer(model: Model) -> str:
    """The key in ``params`` of the layer the network applies last.

    Found from the order in which a forward pass calls the top-level submodules, not
    from the keys, whose order is alphabetical (``Dense_9`` sorts after ``Dense_10``).
    """
    params, _ = jax.eval_shape(model.init, jax.random.key(0))
    return [c.path[0] for c in module_calls(model) if c.path[0] in params][-1]


@partial(jax.jit, static_argnames=("batch_size", "linearised"))
def _sampled_probs(
    post: LaplacePosterior,
    x: jax.Array,
    key: jax.Array,
    ids: jax.Array,
    batch_size: int,
    linearised: bool,
) -> jax.Array:
    """(s, N, C) member log-probabilities for the members ``ids``."""
    z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), post.theta.shape))(
        ids
    )  # (s, P)
    logits = sampled_logits(post, x, z, batch_size=batch_size, linearised=linearised)
    return jax.nn.log_softmax(logits, axis=-1)


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
    deltas = post.curvature.sample(post.prior_precision, z)  # (s, P)

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
    """(N, C) log softmax(μ / √(1 + π/8 σ²)), σ² = diag(J Σ Jᵀ) of the linearised logits."""

    def batch_fn(xb):
        logits = post.logits_fn(post.theta, xb)
        jac = jax.vmap(lambda xi: jax.jacrev(lambda t: post.logits_fn(t, xi[None])[0])(post.theta))(
            xb
        )  # (b, C, P)
        var = post.curvature.function_variance(post.prior_precision, jac)
        return jax.nn.log_softmax(logits * jax.lax.rsqrt(1.0 + math.pi / 8 * var), axis=-1)

    return map_batches(batch_fn, x, batch_size)


@partial(jax.jit, static_argnames=("dense", "kind"))
def _accumulate(
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
    return acc + batch_fn(post.logits_fn, post.theta, x, y, weights, kind)


@partial(jax.jit, static_argnames=("layers", "kind"))
def _kfac_batch(post: LaplacePosterior, x, y, weights, layers: tuple[kfac.Layer, ...], kind):
    """One curvature batch's unnormalised Kronecker factors (``kfac.batch_factors``)."""
    return kfac.batch_factors(post.logits_fn, post.theta, x, y, weights, layers, kind)


_MV_BATCH = 256  # inputs per jitted curvature-vector product (whole curvature batches)


def _curvature_mv(
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
    return cv.curvature_mv(post.logits_fn, post.theta, x, y, w, v, kind)


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
