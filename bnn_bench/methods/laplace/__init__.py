"""``laplace``: post-hoc Laplace approximation around a MAP fit (``method.py``)."""

from bnn_bench.methods.laplace.method import *  # noqa: F403
from bnn_bench.methods.laplace.method import _probit_probs, _sampled_probs  # noqa: F401
