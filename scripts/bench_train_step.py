"""Benchmark: bnn-bench's training step against the bare ``jax.value_and_grad`` step.

Composes a run's config as the CLI does (default: ``experiment=resnet20_fmnist``, the
ResNet-20-FRN MAP preset on the real Fashion-MNIST), builds its data, model and trainer,
and times in one process, interleaved round by round (on a shared machine the load then
hits both alike; the fastest round of each is reported):

  (bare) a jitted ``lax.scan`` of ``--steps`` steps of ``jax.value_and_grad`` of the mean
         cross-entropy of the flax module on ONE fixed, already preprocessed batch, plus
         the trainer's optax update (so the step has something to carry): the floor;
  (run)  the trainer's own compiled chunk (``make_chunk_runner``, what ``Trainer.train``
         scans): per step the minibatch gather from the device-resident uint8 split,
         preprocessing (and augmentation when ``dataset.augment``), dropout keys, the
         same gradient and update.

Prints steps/s of each, their ratio (run / bare), compile times, and the parameter count.

  PYTHONPATH=. python scripts/bench_train_step.py
  PYTHONPATH=. python scripts/bench_train_step.py --steps 50 --repeat 3 \\
      --overrides experiment=resnet20_fmnist trainer.batch_size=128
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax
from hydra import compose, initialize_config_dir

from bnn_bench.cli import CONF
from bnn_bench.methods.training import TrainState, epoch_batches, make_chunk_runner
from bnn_bench.models import build_model, num_params
from bnn_bench.parts import Parts


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=50, help="steps per timed scan")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; fastest is kept")
    p.add_argument(
        "--overrides",
        nargs="*",
        default=["experiment=resnet20_fmnist"],
        help="config overrides, as on the bnn-bench command line (a method that trains)",
    )
    return p.parse_args()


def timed(fn, *args) -> tuple[float, object]:
    tic = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - tic, out


def main() -> None:
    args = parse()
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("config", args.overrides)
    parts = Parts.of(cfg)
    trainer = parts.method.trainer
    data = parts.dataset.load()
    model = build_model(parts.module, data.spec, str(cfg.model.get("_target_")), 1000)
    n, b, steps = data.train.size, trainer.batch_size, args.steps
    params, state = model.init(jax.random.key(0))
    if jax.tree.leaves(state):
        raise SystemExit(
            "the bare step applies the module without batch statistics: "
            "give a model without them (e.g. resnet20_frn, mlp, cnn)"
        )
    tx = trainer.make_optimizer(trainer.num_steps(n))
    ts = TrainState(params, state, tx.init(params))

    # (bare): one fixed batch, preprocessed once, the module applied directly
    x0 = data.spec.preprocess(data.train.x[:b])
    y0 = data.train.y[:b]

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(
            model.module.apply({"params": p}, x0, train=True), y0
        ).mean()

    @jax.jit
    def bare(p, o):
        def step(carry, _):
            p, o = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss

        return jax.lax.scan(step, (p, o), None, length=steps)

    # (run): the trainer's compiled chunk over real minibatches of the device-resident split
    runner = make_chunk_runner(model, tx)
    idx = epoch_batches(jax.random.key(1), n, b)[:steps]
    keys = jax.random.split(jax.random.key(2), steps)

    compile_bare, _ = timed(bare, ts.params, ts.opt_state)
    compile_run, _ = timed(runner, ts, data.train, idx, keys)
    best = {"bare": float("inf"), "run": float("inf")}
    for _ in range(args.repeat):
        t, _ = timed(bare, ts.params, ts.opt_state)
        best["bare"] = min(best["bare"], t)
        t, _ = timed(runner, ts, data.train, idx, keys)
        best["run"] = min(best["run"], t)
    rate = {k: steps / v for k, v in best.items()}
    print(
        json.dumps(
            {
                "overrides": args.overrides,
                "device": str(jax.devices()[0]),
                "params": num_params(params),
                "batch_size": b,
                "train_size": n,
                "steps_per_epoch": n // b,
                "steps_per_s_bare": round(rate["bare"], 3),
                "steps_per_s_run": round(rate["run"], 3),
                "ratio_run_over_bare": round(rate["run"] / rate["bare"], 3),
                "compile_s_first_call_bare": round(compile_bare, 1),
                "compile_s_first_call_run": round(compile_run, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before timing
    main()
