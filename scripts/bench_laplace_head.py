"""Benchmark: a last-layer Laplace predictive from the head's inputs against the whole
forward pass, on ResNet-20-FRN at Fashion-MNIST's shape (28x28x1, 10 classes).

A last-layer posterior keeps every layer before the head at the MAP, so
``LaplacePosterior.with_head_inputs`` runs them once per input set; before, every chunk of
members (and every τ of the prior-precision search) ran them again. Both paths here
evaluate the same linearised validation NLL (``Linearised.nll_fn`` against the
same computation on the whole network's forward pass, 30 members in chunks
of 10, what ``method=laplace_kfac method.structure.subset=last_layer`` uses) at the same τ
values on the same random images and random-init weights (the timing does not depend on
the values); the first τ of each path includes its compilation, and the head path's time
includes computing the head inputs. Prints the seconds per τ and their ratio.

    PYTHONPATH=. python scripts/bench_laplace_head.py --n 2000 --taus 4
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bnn_bench.data import Spec, Split
from bnn_bench.evaluation import metrics as M
from bnn_bench.methods.laplace import Linearised
from bnn_bench.methods.laplace.gaussian import from_diagonal
from bnn_bench.methods.laplace.posterior import LaplacePosterior
from bnn_bench.methods.laplace.structures import last_layer
from bnn_bench.models import build_model
from bnn_bench.models.base import num_params
from bnn_bench.models.resnet import ResNetFRN


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=2000, help="validation inputs")
    ap.add_argument("--taus", type=int, default=4, help="τ values per path")
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args(argv)

    spec = Spec("fashion_mnist", (28, 28, 1), 10, tuple("0123456789"), (0.5,), (0.5,))
    model = build_model(ResNetFRN(num_classes=10), spec, "resnet20_frn", args.batch_size)
    params, state = model.init(jax.random.key(0))
    head = last_layer(model)
    post = LaplacePosterior.at_map(model, params, state, head)
    post = post.replace(curvature=from_diagonal(jnp.full_like(post.theta, 100.0)))
    rng = np.random.default_rng(0)
    val = Split(
        jnp.asarray(rng.integers(0, 256, (args.n, 28, 28, 1)), jnp.uint8),
        jnp.asarray(rng.integers(0, 10, args.n), jnp.int32),
    )
    predictive = Linearised(members=30)
    taus = np.geomspace(0.1, 1e3, args.taus)

    def timed(make):
        tic = time.perf_counter()
        nll_fn = make()
        times, nlls = [], []
        for tau in taus:
            nlls.append(nll_fn(float(tau)))
            times.append(time.perf_counter() - tic)
            tic = time.perf_counter()
        return times, nlls

    key = jax.random.key(1)

    def whole_pass():  # what Predictive.nll_fn computed before with_head_inputs
        def nll(tau):
            p = post.replace(prior_precision=jnp.asarray(tau, jnp.float32))
            chunks = predictive.member_log_probs(key, p, val.x, 10)  # the whole network
            probs = sum(jnp.exp(c).sum(0) for c in chunks)
            return M.nll(probs / predictive.members, val.y)

        return nll

    whole, nll_whole = timed(whole_pass)
    fast, nll_fast = timed(lambda: predictive.nll_fn(key, post, val, 10))
    np.testing.assert_allclose(nll_fast, nll_whole, rtol=1e-5)
    print(
        f"ResNet-20-FRN, {num_params(params):,} parameters, head {head}; {args.n} inputs, "
        f"30 members in chunks of 10; device {jax.devices()[0].device_kind}"
    )
    print("| path | first τ (compile) s | later τ s (mean) |")
    print("|---|---|---|")
    for name, t in (("whole forward pass", whole), ("head inputs", fast)):
        print(f"| {name} | {t[0]:.2f} | {np.mean(t[1:]):.3f} |")
    print(
        f"later τ: whole / head = {np.mean(whole[1:]) / np.mean(fast[1:]):.1f}x; "
        f"val NLL equal to rtol 1e-5 at every τ"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
