"""Benchmark: bnn-bench SGLD vs the bare gradient, BlackJAX in lax.scan and its tutorial loop.

MLP 784-500-10, batch 512, Fashion-MNIST (x / 255, all 60k training images), a
N(0, 1) prior, SGLD with step 4.5e-5: ``--warmup`` steps, then ``--samples`` steps,
each followed by a prediction of the 10k test images folded into the running
predictive. One process, one run of each variant:

  (a) a bare jitted ``value_and_grad`` of the same potential in ``lax.scan`` (plus an
      SGD update to carry): the limit for the warm-up step;
  (b) BlackJAX's ``sgld`` kernel inside ``lax.scan`` (same potential, batches drawn on
      the device), predictions folded into a running sum of probabilities;
  (c) the BlackJAX tutorial's loop: a Python loop calling ``jax.jit(sgld.step)`` per
      iteration, batches from a generator (``jax.random.choice``), predictions folded
      with ``logaddexp`` as the tutorial does;
  (d) bnn-bench's ``SGMCMC`` with the ``sgld`` kernel (``SGMCMC.fit``), streaming every
      sample into the predictive summary.

Prints steps/s for each phase, compile times separately, ratios, and the posterior-
predictive accuracy, NLL and ECE of (b), (c), (d) (the acceptance compares (c) and (d)).

  PYTHONPATH=. python scripts/bench_sgmcmc.py                      # the tutorial's budget
  PYTHONPATH=. python scripts/bench_sgmcmc.py --warmup 500 --samples 200 --variants a,d
"""

from __future__ import annotations

import argparse
import json
import time

import blackjax
import flax.linen as nn
import jax
import jax.numpy as jnp
from blackjax.sgmcmc.gradients import grad_estimator

from bnn_bench.data import load
from bnn_bench.evaluation import EvalPlan
from bnn_bench.evaluation import metrics as M
from bnn_bench.methods.base import RunContext
from bnn_bench.methods.schedules import constant
from bnn_bench.methods.sgmcmc import SGMCMC, make_log_density
from bnn_bench.methods.sgmcmc_kernels import sgld
from bnn_bench.models import build_model
from bnn_bench.models.mlp import MLP


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--warmup", type=int, default=2340, help="warm-up steps (tutorial: 2340)")
    p.add_argument("--samples", type=int, default=1000, help="sampling steps (tutorial: 1000)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--step-size", type=float, default=4.5e-5)
    p.add_argument("--chunk-size", type=int, default=100, help="(d)'s steps per scan chunk")
    p.add_argument("--variants", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args()


def scores(probs, y) -> dict[str, float]:
    return {"acc": M.accuracy(probs, y), "nll": M.nll(probs, y), "ece": M.ece(probs, y)}


def main() -> None:
    args = parse()
    variants = set(args.variants.split(","))
    data = load("fashion_mnist", val_fraction=0.0, mean=[0.0], std=[1.0])
    model = build_model(MLP(num_classes=10, hidden=(500,)), data.spec, "mlp", batch_size=1000)
    n, b, eps = data.train.size, args.batch_size, args.step_size
    W, S = args.warmup, args.samples
    log_density = make_log_density(model, n, prior_scale=1.0)
    params0, _ = model.init(jax.random.key(args.seed))
    train, test = data.train, data.test
    results: dict[str, dict] = {}
    print(
        f"Fashion-MNIST: train {n}, test {test.size}; {W} warm-up + {S} sampling steps; "
        f"batch {b}; step {eps}; device {jax.devices()[0].platform}"
    )

    def timed(fn, *a):
        tic = time.perf_counter()
        out = jax.block_until_ready(fn(*a))
        return out, time.perf_counter() - tic

    def aot(fn, *a):
        tic = time.perf_counter()
        compiled = jax.jit(fn).lower(*a).compile()
        return compiled, time.perf_counter() - tic

    # ------------------------------------------------------------------ (a)
    if "a" in variants:

        def bare(params, key, x, y):
            def body(p, k):
                idx = jax.random.randint(k, (b,), 0, n)
                _, g = jax.value_and_grad(log_density)(p, x[idx], y[idx])
                return jax.tree.map(lambda a, c: a + eps * c, p, g), None

            return jax.lax.scan(body, params, jax.random.split(key, W))[0]

        fn, c = aot(bare, params0, jax.random.key(1), train.x, train.y)
        _, t = timed(fn, params0, jax.random.key(1), train.x, train.y)
        results["a"] = {"warmup_steps_per_s": W / t, "compile_s": c}
        print("a", results["a"], flush=True)

    # ------------------------------------------------------------------ (b)
    if "b" in variants:
        kernel = blackjax.sgld(lambda p, batch: jax.grad(log_density)(p, *batch))

        def warm(params, key, x, y):
            def body(p, k):
                kb, ks = jax.random.split(k)
                idx = jax.random.randint(kb, (b,), 0, n)
                return kernel.step(ks, p, (x[idx], y[idx]), eps), None

            return jax.lax.scan(body, params, jax.random.split(key, W))[0]

        def sample(params, key, x, y, xt):
            def body(carry, k):
                p, prob_sum = carry
                kb, ks = jax.random.split(k)
                idx = jax.random.randint(kb, (b,), 0, n)
                p = kernel.step(ks, p, (x[idx], y[idx]), eps)
                return (p, prob_sum + model.probs(p, {}, xt)), None

            init = (params, jnp.zeros((xt.shape[0], 10)))
            return jax.lax.scan(body, init, jax.random.split(key, S))[0]

        fw, cw = aot(warm, params0, jax.random.key(1), train.x, train.y)
        fs, cs = aot(sample, params0, jax.random.key(2), train.x, train.y, test.x)
        p, tw = timed(fw, params0, jax.random.key(1), train.x, train.y)
        (_, prob_sum), ts = timed(fs, p, jax.random.key(2), train.x, train.y, test.x)
        results["b"] = {
            "warmup_steps_per_s": W / tw,
            "sampling_steps_per_s": S / ts,
            "compile_s": cw + cs,
            **scores(prob_sum / S, test.y),
        }
        print("b", results["b"], flush=True)

    # ------------------------------------------------------------------ (c)
    if "c" in variants:
        results["c"] = tutorial_loop(args, data)
        print("c", results["c"], flush=True)

    # ------------------------------------------------------------------ (d)
    if "d" in variants:
        method = SGMCMC(
            kernel=sgld(),
            step_size=constant(eps),
            batch_size=b,
            iterations=W + S,
            epochs=None,
            burn_in=W,
            burn_in_epochs=None,
            accepted_samples=S,
            chunk_size=args.chunk_size,
        )
        plan = EvalPlan({"test": test.x}, keep=5, capacity=S)
        tic = time.perf_counter()
        post = method.fit(jax.random.key(args.seed), model, data, RunContext(plan))
        wall = time.perf_counter() - tic
        m = post.info
        results["d"] = {
            "warmup_steps_per_s": m["sampler/burn_in_steps_per_s"],
            "sampling_steps_per_s": m["sampler/sampling_steps_per_s"],
            "compile_s": m["time/compile"],
            "wall_s": wall,
            **scores(post.summaries["test"].mean(), test.y),
            "last_sample_acc": m["test/last_sample_acc"],
        }
        print("d", results["d"], flush=True)

    print()
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def tutorial_loop(args, data) -> dict:
    """The BlackJAX sampling book's MLP/SGLD code, run as written (Python loop)."""
    import jax.scipy.stats as stats

    class NN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(features=500)(x))
            return nn.log_softmax(nn.Dense(features=10)(x))

    net = NN()

    def prepare(split):
        x = split.x.reshape(split.size, 28 * 28) / 255.0
        return x, jax.nn.one_hot(split.y, 10)

    X_train, y_train = prepare(data.train)
    X_test, y_test = prepare(data.test)
    data_size = X_train.shape[0]

    def batch_data(rng_key, data, batch_size, data_size):
        while True:
            _, rng_key = jax.random.split(rng_key)
            idx = jax.random.choice(key=rng_key, a=jnp.arange(data_size), shape=(batch_size,))
            yield tuple(elem[idx] for elem in data)

    def logprior_fn(params):
        leaves, _ = jax.tree_util.tree_flatten(params)
        flat_params = jnp.concatenate([jnp.ravel(a) for a in leaves])
        return jnp.sum(stats.norm.logpdf(flat_params))

    def loglikelihood_fn(params, data):
        X, y = data
        return jnp.sum(y * net.apply(params, X))

    @jax.jit
    def update_test_accuracy(i, logpredictprob, sample):
        new = jnp.logaddexp(logpredictprob, jax.vmap(net.apply, in_axes=(None, 0))(sample, X_test))
        return new, jnp.mean(jnp.argmax(jnp.exp(new) / (i + 1), 1) == jnp.argmax(y_test, 1))

    rng_key = jax.random.key(args.seed)
    rng_key, batch_key, init_key = jax.random.split(rng_key, 3)
    batches = batch_data(batch_key, (X_train, y_train), args.batch_size, data_size)
    state = jax.jit(net.init)(init_key, jnp.ones(X_train.shape[-1]))
    sgld_ = blackjax.sgld(grad_estimator(logprior_fn, loglikelihood_fn, data_size))

    def phase(num, sampling, state, logpredict):
        compile_s, tic = 0.0, time.perf_counter()
        for step in range(num):
            nonlocal rng_key
            rng_key, sample_key = jax.random.split(rng_key)
            batch = next(batches)
            state = jax.jit(sgld_.step)(sample_key, state, batch, args.step_size)
            if sampling:
                logpredict, _ = update_test_accuracy(step, logpredict, state)
            if step == 0:  # the first call compiles
                jax.block_until_ready((state, logpredict))
                compile_s, tic = time.perf_counter() - tic, time.perf_counter()
        jax.block_until_ready((state, logpredict))
        return state, logpredict, (num - 1) / (time.perf_counter() - tic), compile_s

    state, _, warm_rate, c1 = phase(args.warmup, False, state, None)
    # the tutorial starts the running log-predictive at the last warm-up state
    logpredict = jax.vmap(net.apply, in_axes=(None, 0))(state, X_test)
    state, logpredict, samp_rate, c2 = phase(args.samples, True, state, logpredict)
    # the tutorial divides the log-sum by num_samples (it also holds the warm-up state)
    probs = jnp.exp(logpredict) / (args.samples + 1)
    last = jnp.exp(jax.vmap(net.apply, in_axes=(None, 0))(state, X_test))
    return {
        "warmup_steps_per_s": warm_rate,
        "sampling_steps_per_s": samp_rate,
        "compile_s": c1 + c2,
        **scores(probs, data.test.y),
        "last_sample_acc": M.accuracy(last, data.test.y),
    }


def report(r: dict) -> None:
    names = {
        "a": "(a) bare value_and_grad in scan",
        "b": "(b) blackjax.sgld in scan",
        "c": "(c) BlackJAX tutorial loop",
        "d": "(d) bnn-bench sgld",
    }
    print(
        f"\n{'variant':34s} {'warm-up st/s':>12s} {'sampling st/s':>13s} {'compile s':>9s}"
        f" {'acc':>7s} {'nll':>7s} {'ece':>7s}"
    )
    for k in sorted(r):
        v = r[k]
        print(
            f"{names[k]:34s} {v['warmup_steps_per_s']:12.1f} "
            f"{v.get('sampling_steps_per_s', float('nan')):13.2f} {v['compile_s']:9.1f} "
            f"{v.get('acc', float('nan')):7.4f} {v.get('nll', float('nan')):7.4f} "
            f"{v.get('ece', float('nan')):7.4f}"
        )
    if "d" in r:
        d = r["d"]
        if "a" in r:
            print(
                f"warm-up (d)/(a) = {d['warmup_steps_per_s'] / r['a']['warmup_steps_per_s']:.3f}"
                "  (target >= 0.9)"
            )
        for k in ("b", "c"):
            if k in r:
                print(
                    f"(d)/({k}): warm-up "
                    f"{d['warmup_steps_per_s'] / r[k]['warmup_steps_per_s']:.3f}, sampling "
                    f"{d['sampling_steps_per_s'] / r[k]['sampling_steps_per_s']:.3f}"
                )


if __name__ == "__main__":
    main()
