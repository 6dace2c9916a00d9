"""``laplace``: post-hoc Laplace approximation around a MAP fit (MacKay, 1992; Daxberger+ 2021).

    p(θ | D) ≈ N(θ*, (G + τ I)⁻¹),   G = (N / n) Σ_{i ≤ n} J_iᵀ Λ_i J_i  (GGN, or empirical Fisher)

Λ_i comes from the model's likelihood (``model.likelihood``): the softmax Hessian for
``likelihood=categorical``, 1/σ² on the mean (and 2 on log σ) for ``likelihood=gaussian``.

The package mirrors ``conf/method/laplace/``, one module per config group:

* ``method.py``: ``Laplace``, the method (a ``PostHoc``: the MAP, then G, then τ);
* ``structures.py`` (``structure``): ``Lanczos`` (rank-k eigenpairs; laplax's
  ``create_posterior_fn("lanczos")``), ``Diagonal`` (the exact diagonal), ``LastLayer``
  (dense over the last layer), ``Full`` (dense over all parameters) or ``KFAC`` (one
  eigendecomposed Kronecker block per layer, ``kfac.py``; all layers or the last);
* ``curvature.py`` (``curvature``): ``GGN`` or ``EmpiricalFisher``, their products, Lanczos;
* ``prior_precision.py`` (``prior_precision``): ``ValNLL`` (the validation-NLL minimiser on
  a grid), ``MargLik`` (the maximiser of the Laplace evidence) or ``Fixed`` (or a number);
* ``predictives.py`` (``predictive``): ``Linearised`` (f(x, θ*) + J(x) δ; laplax's
  ``lin_mc_pred_act``), ``WeightSpace`` (f(x, θ* + δ)) or ``Probit`` (one member,
  softmax(μ / √(1 + π/8 σ²)); MacKay, 1992; classification only);

and beside them ``posterior.py`` (``LaplacePosterior``), ``gaussian.py`` (the forms of G
and the Gaussian and evidence on them) and ``passes.py`` (the jitted passes over the
curvature batches).
"""

from bnn_bench.methods.laplace.curvature import GGN, EmpiricalFisher
from bnn_bench.methods.laplace.method import Laplace
from bnn_bench.methods.laplace.posterior import LaplacePosterior
from bnn_bench.methods.laplace.predictives import (
    Linearised,
    Predictive,
    Probit,
    WeightSpace,
    sampled_logits,
)
from bnn_bench.methods.laplace.prior_precision import Fixed, MargLik, PriorPrecision, ValNLL
from bnn_bench.methods.laplace.structures import (
    KFAC,
    Diagonal,
    Full,
    Lanczos,
    LastLayer,
    Structure,
    last_layer,
)

__all__ = [
    "GGN",
    "KFAC",
    "Diagonal",
    "EmpiricalFisher",
    "Fixed",
    "Full",
    "Lanczos",
    "Laplace",
    "LaplacePosterior",
    "LastLayer",
    "Linearised",
    "MargLik",
    "Predictive",
    "PriorPrecision",
    "Probit",
    "Structure",
    "ValNLL",
    "WeightSpace",
    "last_layer",
    "sampled_logits",
]
