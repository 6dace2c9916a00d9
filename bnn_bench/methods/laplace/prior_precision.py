"""How τ, the prior precision, is chosen once the curvature is known:
``method/laplace/prior_precision=val_nll|marglik|fixed`` (or a number).

* ``ValNLL``: the validation-NLL minimiser on a grid, refined;
* ``MargLik``: the maximiser of the Laplace evidence;
* ``Fixed``: a given τ.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import jax
import numpy as np
from scipy.optimize import minimize_scalar

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.methods.laplace.gaussian import maximise_marginal_likelihood
from bnn_bench.methods.laplace.passes import progress_bar
from bnn_bench.methods.laplace.posterior import LaplacePosterior
from bnn_bench.methods.laplace.predictives import Predictive

logger = logging.getLogger(__name__)

REFINE_XATOL = 0.01  # val_nll's refinement: log τ to 0.01, τ to about 1%


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
        members_per_chunk: int,
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

    def choose(self, key, post, loglik, sq, val, predictive, members_per_chunk):
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

    def choose(self, key, post, loglik, sq, val, predictive, members_per_chunk):
        low, high = (math.log(v) for v in _check_range(self.prior_range))
        log_grid = np.linspace(low, high, self.grid_size)
        nll_fn = predictive.nll_fn(key, post, val, members_per_chunk)
        nlls = []
        for tau in progress_bar(np.exp(log_grid), desc="prior precision (val NLL)"):
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

    def choose(self, key, post, loglik, sq, val, predictive, members_per_chunk):
        curv = post.curvature
        tau, _ = maximise_marginal_likelihood(curv, loglik, sq, *self.prior_range)
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
