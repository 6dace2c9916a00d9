"""Which parameters the Gaussian covers and the form of its curvature G:
``method/laplace/structure=lanczos|diagonal|last_layer|full|kfac``.

* ``Lanczos``: rank-k eigenpairs (laplax's ``create_posterior_fn("lanczos")``);
* ``Diagonal``: the exact diagonal;
* ``Full``: dense over all parameters (tiny networks);
* ``LastLayer``: dense over the last layer's parameters;
* ``KFAC``: one eigendecomposed Kronecker block per layer (``kfac.py``), all layers or
  the last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

from bnn_bench.data import Split
from bnn_bench.errors import UserError
from bnn_bench.likelihoods import LearnedNoise
from bnn_bench.methods.laplace import curvature as cv
from bnn_bench.methods.laplace import kfac
from bnn_bench.methods.laplace.gaussian import AnyCurvature, Curvature, from_dense, from_diagonal
from bnn_bench.methods.laplace.passes import batches_mv, kfac_batch, progress_bar, summed
from bnn_bench.methods.laplace.posterior import LaplacePosterior
from bnn_bench.models import Model, module_calls, num_params

FULL_MAX_PARAMS = 5000  # a dense P x P eigendecomposition beyond this is impractical


class Structure:
    """The form of G: ``head`` picks the parameters, ``fit`` builds G from the curvature
    batches."""

    def head(self, model: Model) -> str | None:
        """The key in ``params`` the Gaussian is over, or None for all parameters."""
        del model
        return None

    def describe(self) -> str:
        """The choice as a user writes it, for messages."""
        return f"method/laplace/structure={type(self).__name__.lower()}"

    def check(self, model: Model, head: str | None, dim: int) -> None:
        """Refuses a model, or ``dim`` parameters under ``head``, the structure cannot
        hold (before training)."""
        del model, head, dim

    def covers(self, model: Model) -> tuple[str | None, int]:
        """The layer the Gaussian covers (``head``; None: every parameter) and its
        parameter count, after ``check`` (shapes only, no compute)."""
        shapes, _ = jax.eval_shape(model.init, jax.random.key(0))
        head = self.head(model)
        if head is not None and isinstance(model.module, LearnedNoise):
            raise UserError(
                f"{self.describe()} covers the last layer of a plain network; with "
                "likelihood.noise=learned the network is wrapped with its log_noise "
                "parameter, which the last layer would leave out. Use "
                "method/laplace/structure=full, diagonal or lanczos (they cover log_noise), "
                "or likelihood.noise=fixed or heteroscedastic."
            )
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
    ) -> AnyCurvature:
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
        with progress_bar(total=min(self.rank, dim), desc="lanczos", unit="mv") as pbar:
            evals, evecs = cv.lanczos(
                key,
                lambda v: factor * batches_mv(post, xs, ys, weights, v, kind),
                dim,
                self.rank,
                progress=pbar.update,
            )
        return Curvature(evecs, evals, jnp.zeros(dim, jnp.float32))


@dataclass(frozen=True)
class Diagonal(Structure):
    """The exact diagonal of G (per-example vector-Jacobian products, not a Hutchinson
    estimate)."""

    def fit(self, key, post, train, idx, weights, factor, kind):
        del key
        return from_diagonal(factor * summed(post, train, idx, weights, kind, dense=False))


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
        return from_dense(factor * summed(post, train, idx, weights, kind, dense=True))


@dataclass(frozen=True)
class LastLayer(Full):
    """G dense over the last layer's parameters; the rest stay at θ*."""

    def head(self, model: Model) -> str | None:
        return last_layer(model)

    def describe(self) -> str:
        return "method/laplace/structure=last_layer"

    def check(self, model: Model, head: str | None, dim: int) -> None:
        del model, head, dim  # a last layer is small


@dataclass(frozen=True)
class KFAC(Structure):
    """Kronecker-factored G, one block A ⊗ B per dense or convolution layer (Martens &
    Grosse, 2015; Ritter et al., 2018; KFC for convolutions), each factor
    eigendecomposed, so every τ costs no refactorisation (``kfac.py``).

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

    def describe(self) -> str:
        return f"method/laplace/structure=kfac method.structure.subset={self.subset}"

    def check(self, model: Model, head: str | None, dim: int) -> None:
        if isinstance(model.module, LearnedNoise):
            raise UserError(
                "method/laplace/structure=kfac has Kronecker blocks for dense and "
                "convolution layers only, not for the log_noise parameter of "
                "likelihood.noise=learned. Use method/laplace/structure=full, diagonal or "
                "lanczos, or likelihood.noise=fixed or heteroscedastic."
            )
        kfac.find_layers(model, head)

    def fit(self, key, post, train, idx, weights, factor, kind):
        del key
        prefix = (post.head,) if post.head is not None else ()
        layers = kfac.find_layers(post.model, post.head)
        sums = None
        for i in progress_bar(range(idx.shape[0]), desc="kfac factors", unit="batch"):
            batch = kfac_batch(post, train.x[idx[i]], train.y[idx[i]], weights[i], layers, kind)
            sums = batch if sums is None else jax.tree.map(jnp.add, sums, batch)
        return kfac.kronecker(
            sums, layers, prefix, float(weights.sum()), factor, post.unravel, self.separate_bias
        )


def last_layer(model: Model) -> str:
    """The key in ``params`` of the layer the network applies last.

    Found from the order in which a forward pass calls the top-level submodules, not
    from the keys, whose order is alphabetical (``Dense_9`` sorts after ``Dense_10``).
    """
    params, _ = jax.eval_shape(model.init, jax.random.key(0))
    return [c.path[0] for c in module_calls(model) if c.path[0] in params][-1]
