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

Warm-up breakdown (where SGLD's time goes against the bare gradient), each adding one
piece to the one before: (g) the bare gradient on one fixed batch; (a) + the batch
gather; (n) + the noise draw and SGLD update (keys split ahead, as (b)); (k) + bnn-bench's
per-step keys (``fold_in(key, step)``, split per chain, split batch/step).

``--repeat R`` runs every variant R times, interleaved, and reports the fastest round
of each phase: on a shared machine the load then hits every variant alike.

Prints steps/s for each phase, compile times separately, ratios, and the posterior-
predictive accuracy, NLL and ECE of (b), (c), (d) (the acceptance compares (c) and (d)).

  PYTHONPATH=. python scripts/bench_sgmcmc.py                      # the tutorial's budget
  PYTHONPATH=. python scripts/bench_sgmcmc.py --warmup 500 --samples 200 --variants a,d
  PYTHONPATH=. python scripts/bench_sgmcmc.py --variants g,a,n,k,b,d --repeat 3
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

from bnn_bench.data import preset
from bnn_bench.evaluation import EvalInputs
from bnn_bench.evaluation import metrics as M
from bnn_bench.methods.base import RunContext
from bnn_bench.methods.sampling.kernels import gaussian_noise, make_log_density, sgld
from bnn_bench.methods.sampling.schedules import constant
from bnn_bench.methods.sampling.sgmcmc import SGMCMC
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
    p.add_argument("--variants", default="a,b,c,d", help="comma-separated subset of g,a,n,k,b,c,d")
    p.add_argument(
        "--repeat", type=int, default=1, help="interleaved rounds; the fastest is reported"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args()


def scores(probs, y) -> dict[str, float]:
    return {"acc": M.accuracy(probs, y), "nll": M.nll(probs, y), "ece": M.ece(probs, y)}


def main() -> None:
    args = parse()
    variants = [v for v in "gankbcd" if v in args.variants.split(",")]
    data = preset("fashion_mnist", val_fraction=0.0, mean=[0.0], std=[1.0])
    model = build_model(MLP(num_classes=10, hidden=(500,)), data.spec, "mlp", batch_size=1000)
    n, W = data.train.size, args.warmup
    print(
        f"Fashion-MNIST: train {n}, test {data.test.size}; {W} warm-up + {args.samples} "
        f"sampling steps; batch {args.batch_size}; step {args.step_size}; device "
        f"{jax.devices()[0].platform}; best of {args.repeat} interleaved rounds"
    )
    runs = {v: BUILD[v](args, data, model) for v in variants}  # compiled once each
    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeat):  # round robin: the machine's load hits every variant alike
        for v in variants:
            rounds[v].append(runs[v]())
            print(r, v, rounds[v][-1], flush=True)
    results = {v: best(rounds[v]) for v in variants}
    print()
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"best": results, "rounds": rounds}, f, indent=1)


def best(rounds: list[dict]) -> dict:
    """The fastest round's rates (each phase on its own), the other numbers of the last."""
    out = dict(rounds[-1])
    for k in out:
        if "steps_per" in k:
            out[k] = max(r[k] for r in rounds)
    return out


def _timed(fn, *a) -> tuple[object, float, float]:
    """``fn(*a)``, its wall seconds and the process's CPU seconds (all threads): on a
    shared machine the CPU time is what the work cost, the wall time also the waiting."""
    tic, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*a))
    return out, time.perf_counter() - tic, time.process_time() - cpu


def _aot(fn, *a):
    tic = time.perf_counter()
    compiled = jax.jit(fn).lower(*a).compile()
    return compiled, time.perf_counter() - tic


def _setup(args, data, model):
    n, b, eps = data.train.size, args.batch_size, args.step_size
    log_density = make_log_density(model, n, prior_scale=1.0)
    params0, _ = model.init(jax.random.key(args.seed))
    return n, b, eps, log_density, params0


def _warmup_only(args, data, body_fn, keys_fn):
    """A warm-up-only variant: ``body_fn(p, k, x, y)`` scanned over ``keys_fn(key)``."""

    def fn(params, key, x, y):
        return jax.lax.scan(lambda p, k: (body_fn(p, k, x, y), None), params, keys_fn(key))[0]

    return fn


def build_bare(args, data, model, gather=True, noise=False, fold=False):
    """(g), (a), (n), (k): the bare gradient step, then SGLD's pieces added one by one."""
    n, b, eps, log_density, params0 = _setup(args, data, model)
    train, W = data.train, args.warmup
    fixed = jnp.arange(b)

    def body(p, k, x, y):
        if fold:  # bnn-bench's keys: fold_in(run key, step), one per chain, then batch/step
            k = jax.random.split(jax.random.fold_in(KEY, k), 1)[0]
        kb, ks = jax.random.split(k) if noise else (k, k)
        idx = jax.random.randint(kb, (b,), 0, n) if gather else fixed
        g = jax.grad(log_density)(p, x[idx], y[idx])
        if not noise:
            return jax.tree.map(lambda a, c: a + eps * c, p, g)
        z = gaussian_noise(ks, p)
        scale = jnp.sqrt(2.0 * eps)
        return jax.tree.map(lambda a, c, e: a + eps * c + scale * e, p, g, z)

    keys = (lambda key: jnp.arange(W)) if fold else (lambda key: jax.random.split(key, W))
    fn, c = _aot(_warmup_only(args, data, body, keys), params0, KEY, train.x, train.y)

    def once():
        _, t, cpu = _timed(fn, params0, KEY, train.x, train.y)
        return {"warmup_steps_per_s": W / t, "warmup_steps_per_cpu_s": W / cpu, "compile_s": c}

    return once


KEY = jax.random.key(1)


def build_blackjax(args, data, model):
    """(b): BlackJAX's sgld kernel in lax.scan."""
    n, b, eps, log_density, params0 = _setup(args, data, model)
    W, S, train, test = args.warmup, args.samples, data.train, data.test
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

    fw, cw = _aot(warm, params0, KEY, train.x, train.y)
    fs, cs = _aot(sample, params0, jax.random.key(2), train.x, train.y, test.x)

    def once():
        p, tw, cw_cpu = _timed(fw, params0, KEY, train.x, train.y)
        (_, prob_sum), ts, cs_cpu = _timed(fs, p, jax.random.key(2), train.x, train.y, test.x)
        return {
            "warmup_steps_per_s": W / tw,
            "sampling_steps_per_s": S / ts,
            "warmup_steps_per_cpu_s": W / cw_cpu,
            "sampling_steps_per_cpu_s": S / cs_cpu,
            "compile_s": cw + cs,
            **scores(prob_sum / S, test.y),
        }

    return once


def build_bnn_bench(args, data, model):
    """(d): ``SGMCMC.fit`` with the sgld kernel, every sample folded into the summary."""
    W, S = args.warmup, args.samples
    method = SGMCMC(
        kernel=sgld(),
        step_size=constant(args.step_size),
        batch_size=args.batch_size,
        steps=W + S,
        epochs=None,
        burn_in=W,
        burn_in_epochs=None,
        members_per_chain=S,
        chunk_size=args.chunk_size,
    )
    inputs = EvalInputs({"test": data.test.x}, keep=5, capacity=S)

    def once():  # fit compiles ahead of time; the logger marks each chunk's end
        marks: list[tuple[int, float, float]] = []  # (step, wall, cpu) at each chunk's end
        on_chunk = lambda values, step: marks.append(  # noqa: E731
            (step, time.perf_counter(), time.process_time())
        )
        tic = time.perf_counter()
        post = method.fit(jax.random.key(args.seed), model, data, RunContext(inputs, on_chunk))
        m = post.info
        # rates from the first chunk's end (after the compile) to the end of each phase
        (s0, w0, c0), (s1, w1, c1), (s2, w2, c2) = (
            marks[0],
            next(mk for mk in marks if mk[0] == W),
            marks[-1],
        )
        return {
            "warmup_steps_per_s": (s1 - s0) / (w1 - w0),
            "sampling_steps_per_s": (s2 - s1) / (w2 - w1),
            "warmup_steps_per_cpu_s": (s1 - s0) / (c1 - c0),
            "sampling_steps_per_cpu_s": (s2 - s1) / (c2 - c1),
            "compile_s": m["time/compile"],
            "wall_s": time.perf_counter() - tic,
            **scores(post.summaries["test"].mean(), data.test.y),
            "last_sample_acc": m["test/last_sample_acc"],
        }

    return once


BUILD = {
    "g": lambda a, d, m: build_bare(a, d, m, gather=False),
    "a": build_bare,
    "n": lambda a, d, m: build_bare(a, d, m, noise=True),
    "k": lambda a, d, m: build_bare(a, d, m, noise=True, fold=True),
    "b": build_blackjax,
    "c": lambda a, d, m: lambda: tutorial_loop(a, d),
    "d": build_bnn_bench,
}


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
        "g": "(g) bare grad, one fixed batch",
        "a": "(a) bare value_and_grad in scan",
        "n": "(n) (a) + SGLD noise draw",
        "k": "(k) (n) + bnn-bench's key folding",
        "b": "(b) blackjax.sgld in scan",
        "c": "(c) BlackJAX tutorial loop",
        "d": "(d) bnn-bench sgld",
    }
    nan = float("nan")
    print(
        f"{'variant':34s} {'warm-up st/s':>12s} {'(per CPU s)':>11s} {'sampling st/s':>13s}"
        f" {'(per CPU s)':>11s} {'compile s':>9s} {'acc':>7s} {'nll':>7s} {'ece':>7s}"
    )
    for k, v in r.items():
        print(
            f"{names[k]:34s} {v['warmup_steps_per_s']:12.1f} "
            f"{v.get('warmup_steps_per_cpu_s', nan):11.1f} "
            f"{v.get('sampling_steps_per_s', nan):13.2f} "
            f"{v.get('sampling_steps_per_cpu_s', nan):11.2f} {v['compile_s']:9.1f} "
            f"{v.get('acc', nan):7.4f} {v.get('nll', nan):7.4f} {v.get('ece', nan):7.4f}"
        )
    # where a warm-up step's CPU time goes, against the bare gradient: each row is what
    # one variant adds to the one before it
    ms = {k: 1e3 / v["warmup_steps_per_cpu_s"] for k, v in r.items() if k != "c"}
    for k, base, what in (
        ("a", "g", "batch gather"),
        ("n", "a", "noise draw and update"),
        ("k", "n", "per-step key folding"),
        ("d", "k", "bnn-bench's loop beyond (k)"),
        ("b", "n", "blackjax beyond (n)"),
    ):
        if k in ms and base in ms:
            print(f"  ({k}) - ({base}) {what:30s} {ms[k] - ms[base]:+7.2f} CPU ms/step")
    if "d" not in r:
        return
    d = r["d"]
    for unit in ("s", "cpu_s"):
        if "a" in r:
            ratio = d[f"warmup_steps_per_{unit}"] / r["a"][f"warmup_steps_per_{unit}"]
            print(f"per {unit}: warm-up (d)/(a) = {ratio:.3f}")
        for k in ("b", "c"):
            if k in r and f"warmup_steps_per_{unit}" in r[k]:
                w = d[f"warmup_steps_per_{unit}"] / r[k][f"warmup_steps_per_{unit}"]
                sa = d[f"sampling_steps_per_{unit}"] / r[k][f"sampling_steps_per_{unit}"]
                print(f"per {unit}: (d)/({k}) warm-up {w:.3f}, sampling {sa:.3f}")


if __name__ == "__main__":
    main()
