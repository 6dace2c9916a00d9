"""Benchmark: bnn-bench's Laplace against laplax on the same trained CNN, same rank.

Both build a Lanczos low-rank GGN posterior from the same training batches (scaled to
the training-set size) around the same MAP network (a ``map`` run's checkpoint), then
predict the test set with the linearised Monte-Carlo predictive. Reported: time to
build the posterior and to predict (first call, compilation included, and a second
warm call), their ratios, and accuracy / NLL / ECE side by side, plus the top Ritz
values of both curvatures.

laplax pins nothing that conflicts with bnn-bench's jax, but install it apart from the
shared environment, e.g.:

    python -m venv --system-site-packages /tmp/laplax_venv
    /tmp/laplax_venv/bin/pip install laplax
    bnn-bench experiment=laplax_mnist dataset=fashion_mnist method=map \\
        hydra.run.dir=outputs/fmnist_map
    PYTHONPATH=. /tmp/laplax_venv/bin/python scripts/bench_laplace.py --map-run outputs/fmnist_map
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bnn_bench.data import preset
from bnn_bench.evaluation import EvalInputs
from bnn_bench.evaluation import metrics as M
from bnn_bench.methods.laplace import Fixed, Lanczos, Laplace, Linearised
from bnn_bench.methods.laplace.curvature import GGN
from bnn_bench.methods.point.map import load_point
from bnn_bench.methods.training import Trainer
from bnn_bench.models import build_model
from bnn_bench.models.cnn import CNN


def _timed(fn):
    tic = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - tic


def _scores(probs, labels) -> dict[str, float]:
    return {
        "acc": M.accuracy(probs, labels),
        "nll": M.nll(probs, labels),
        "ece": M.ece(probs, labels, 15),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--map-run", required=True, help="a map run folder (checkpoint/map.msgpack)")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--rank", type=int, default=100, help="Lanczos iterations (laplax maxiter)")
    ap.add_argument("--batches", type=int, default=4, help="curvature batches")
    ap.add_argument("--batch-size", type=int, default=32, help="curvature batch size")
    ap.add_argument("--prior-precision", type=float, default=1e4)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--test-size", type=int, default=None, help="first N test inputs (all)")
    ap.add_argument(
        "--laplax-batch",
        type=int,
        default=100,
        help="test inputs per vmapped laplax pushforward call",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    try:
        from laplax.curv.cov import create_posterior_fn
        from laplax.curv.ggn import create_ggn_mv_without_data
        from laplax.eval.pushforward import (
            lin_mc_pred_act,
            lin_pred_mean,
            lin_setup,
            set_lin_pushforward,
        )
        from laplax.util.loader import DataLoaderMV, reduce_add
    except ImportError as e:
        print(
            f"laplax is not importable ({e}); see --help for installing it apart.", file=sys.stderr
        )
        return 2

    data = preset(args.dataset)
    model = build_model(CNN(data.spec.num_classes), data.spec, "cnn", 1000)
    params, state = load_point(args.map_run, model)
    x_test, y_test = data.test.x, data.test.y
    if args.test_size:
        x_test, y_test = x_test[: args.test_size], y_test[: args.test_size]
    key = jax.random.key(0)
    results: dict[str, dict] = {"config": vars(args), "device": jax.devices()[0].platform}

    # --- MAP
    map_probs = model.probs(params, state, x_test)
    results["map"] = _scores(map_probs, y_test)

    # --- bnn-bench
    method = Laplace(
        trainer=Trainer(),
        init_from=args.map_run,
        structure=Lanczos(rank=args.rank),
        curvature=GGN(),
        curvature_batches=args.batches,
        curvature_batch_size=args.batch_size,
        prior_precision=Fixed(args.prior_precision),
        predictive=Linearised(members=args.samples),
    )
    inputs = EvalInputs({"test": x_test})
    ours: dict[str, float] = {}
    for run in ("cold", "warm"):
        post, ours[f"build_{run}_s"] = _timed(lambda: method.fit(key, model, data))
        summ, ours[f"predict_{run}_s"] = _timed(
            lambda post=post: method.predict(jax.random.key(1), post, inputs)["test"]
        )
    ours |= _scores(summ.mean(), y_test)
    ours["top_eigvals"] = np.asarray(post.curvature.eigvals[:5]).tolist()
    results["bnn_bench"] = ours

    # --- laplax, on the same examples as bnn-bench's curvature
    idx, _ = method._curvature_batches(jax.random.fold_in(key, 1), data.train.size)
    batches = [{"input": data.train.x[i], "target": data.train.y[i]} for i in idx]

    def model_fn(input, params):  # laplax calls it per input
        return model.apply(params, state, input[None])[0][0]

    theirs: dict[str, float] = {}
    prior = {"prior_prec": args.prior_precision}
    for run in ("cold", "warm"):

        def build():
            # As the tutorial's DataLoaderMV over a few batches, with the per-batch GGN
            # jitted with the data as an argument (closing over it as a constant makes
            # XLA constant-fold the convolutions for minutes).
            mv = jax.jit(
                create_ggn_mv_without_data(
                    model_fn,
                    params,
                    loss_fn="cross_entropy",
                    factor=data.train.size / (len(batches) * args.batch_size),
                )
            )
            mv = DataLoaderMV(mv, batches, transform=lambda b: b, reduce=reduce_add)
            # `rank` is the iteration count of laplax's lanczos_lowrank; the tutorial's
            # `maxiter=100` is swallowed by its **kwargs (laplax 0.0.2), which runs 20.
            return create_posterior_fn(
                "lanczos", mv=mv, layout=params, key=key, rank=args.rank, mv_jit=False
            )

        posterior_fn, theirs[f"build_{run}_s"] = _timed(build)
        pushforward = jax.jit(
            jax.vmap(
                set_lin_pushforward(
                    model_fn=model_fn,
                    mean_params=params,
                    posterior_fn=posterior_fn,
                    prior_arguments=prior,
                    pushforward_fns=[lin_setup, lin_pred_mean, lin_mc_pred_act],
                    key=jax.random.key(1),
                    num_samples=args.samples,
                )
            )
        )

        def predict(pushforward=pushforward):
            b = args.laplax_batch
            return jnp.concatenate(
                [
                    pushforward(x_test[i : i + b])["mc_pred_act"]
                    for i in range(0, x_test.shape[0], b)
                ]
            )

        probs, theirs[f"predict_{run}_s"] = _timed(predict)
    theirs |= _scores(probs, y_test)
    scale = posterior_fn(prior, 1.0).state["scale"]
    s = np.asarray(scale.S, np.float64) + np.asarray(scale.scalar, np.float64)
    theirs["top_eigvals"] = np.sort(1.0 / s**2 - args.prior_precision)[::-1][:5].tolist()
    theirs["rank"] = int(s.shape[0])
    ours["rank"] = int(post.curvature.eigvals.shape[0])
    results["laplax"] = theirs

    results["ratio_laplax_over_bnn_bench"] = {
        k: theirs[k] / ours[k] for k in ours if k.endswith("_s")
    }
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
