"""``laplace``: post-hoc Laplace approximation around a MAP fit (MacKay, 1992; Daxberger+ 2021).

    p(θ | D) ≈ N(θ*, (G + τ I)⁻¹),   G = (N / n) Σ_{i ≤ n} J_iᵀ Λ_i J_i  (GGN, or empirical Fisher)

Λ_i comes from the model's likelihood (``model.likelihood``): the softmax Hessian for
``likelihood=categorical``, 1/σ² on the mean (and 2 on log σ) for ``likelihood=gaussian``.

θ* comes from ``PostHoc``: trained with the ``trainer`` group (the same network
``method=map`` trains with the same seed) or loaded from an earlier run (``init_from``).
G comes from matrix-vector products over ``curvature_batches`` training batches (all of
them by default), scaled to the N training examples as laplax's ``create_ggn_mv(...,
num_total_samples=N)``. Each choice is an object, chosen by a config group under
``conf/method/laplace/``: ``structure`` (``structures.py``), ``curvature``
(``curvature.py``), ``prior_precision`` (``prior_precision.py``) and ``predictive``
(``predictives.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from bnn_bench.data import Dataset
from bnn_bench.errors import UserError
from bnn_bench.methods.base import RunContext, Work
from bnn_bench.methods.laplace import curvature as cv
from bnn_bench.methods.laplace.gaussian import log_marginal_likelihood
from bnn_bench.methods.laplace.passes import log_likelihood
from bnn_bench.methods.laplace.posterior import LaplacePosterior
from bnn_bench.methods.laplace.predictives import Linearised, Predictive
from bnn_bench.methods.laplace.prior_precision import Fixed, PriorPrecision, ValNLL
from bnn_bench.methods.laplace.structures import Lanczos, Structure
from bnn_bench.methods.posthoc import PostHoc
from bnn_bench.methods.training import epoch_batches
from bnn_bench.models import Model, Params, State

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Laplace(PostHoc):
    """Post-hoc Laplace approximation with a GGN (or empirical Fisher) curvature of the
    model's likelihood (``model.likelihood``: categorical or Gaussian).

    Attributes:
      trainer, init_from: the MAP network (``PostHoc``).
      structure: the form of G: ``Lanczos``, ``Diagonal``, ``LastLayer``, ``Full`` or
        ``KFAC``.
      curvature: the loss curvature: ``GGN`` or ``EmpiricalFisher``.
      prior_precision: how τ is chosen: ``ValNLL``, ``MargLik``, ``Fixed``, or a number.
      predictive: how members are drawn: ``Linearised``, ``WeightSpace`` or ``Probit``.
      curvature_batches: training batches the curvature is summed over (scaled to the
        full data size); None for the whole training split.
      curvature_batch_size: inputs per curvature batch.
      members_per_chunk: members per streamed chunk (s, N, M).
    """

    structure: Structure = field(default_factory=Lanczos)
    curvature: cv.LossCurvature = field(default_factory=cv.GGN)
    prior_precision: PriorPrecision | float = field(default_factory=ValNLL)
    predictive: Predictive = field(default_factory=Linearised)
    curvature_batches: int | None = 50
    curvature_batch_size: int = 32
    members_per_chunk: int = 10

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
        if min(self.curvature_batch_size, self.members_per_chunk) < 1 or (
            self.curvature_batches is not None and self.curvature_batches < 1
        ):
            raise UserError(
                "method.curvature_batches, curvature_batch_size and members_per_chunk must be >= 1."
            )
        super().__post_init__()  # init_from's checkpoint, before data or training

    def check(self, model: Model, data: Dataset) -> None:
        """Refuses a structure ``fit`` would refuse (e.g. ``full`` over more than
        ``FULL_MAX_PARAMS`` parameters, ``kfac`` on a depthwise convolution), and a
        prior-precision choice the data cannot serve (``val_nll`` without a validation
        split) and a predictive the likelihood has no form for (``probit`` for
        regression), before the MAP is trained."""
        super().check(model, data)
        self.structure.covers(model)
        self.prior_precision.check(data)
        self.predictive.check(model.likelihood)

    def fit_map(
        self,
        key: jax.Array,
        model: Model,
        data: Dataset,
        params: Params,
        state: State,
        ctx: RunContext,
    ) -> LaplacePosterior:
        """The curvature at the MAP network ``(params, state)``, then τ."""
        # --- curvature
        tic = time.perf_counter()
        post = LaplacePosterior.at_map(model, params, state, self.structure.head(model))
        dim = post.theta.shape[0]
        idx, weights = self._curvature_batches(jax.random.fold_in(key, 1), data.train.size)
        factor = data.train.size / float(weights.sum())
        curv = self.structure.fit(
            jax.random.fold_in(key, 2), post, data.train, idx, weights, factor, self.curvature
        )
        loglik = factor * float(log_likelihood(post, data.train, idx, weights))
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
            jax.random.fold_in(key, 3),
            post,
            loglik,
            sq,
            data.val,
            self.predictive,
            self.members_per_chunk,
        )
        lml = float(log_marginal_likelihood(curv, tau, loglik, sq))
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
            "laplace/time_curvature": t_curv,
            "laplace/time_prior": t_prior,
        }
        ctx.log({"laplace/prior_precision": tau, "laplace/log_marglik": lml}, 0)
        ctx.count(samples=self.predictive.members)
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

    def member_log_probs(
        self, key: jax.Array, posterior: LaplacePosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        """Chunks of what the predictive's members yield (``likelihood.member``): class
        log-probabilities (s, N, C), or a Gaussian's (mean, log σ) (s, N, 2)."""
        posterior, x = posterior.with_head_inputs(x)  # last layer: the body's pass once
        return self.predictive.member_log_probs(key, posterior, x, self.members_per_chunk)

    def plan_map(self, model: Model, data: Dataset) -> Work:
        """No steps after the MAP (the curvature takes forward and backward passes, not
        optimiser steps); the predictive's members (1 for the probit predictive)."""
        del model, data
        return Work(
            steps=0,
            grad_evals=0,
            members=self.predictive.members,
            batch_size=self.curvature_batch_size,
            networks=1,
        )
