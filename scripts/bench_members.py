"""Benchmark: K networks trained vmapped in one loop (Trainer.train_members) vs one by one.

Trains K members on synthetic data both ways, with the same budget, and prints the wall
times (compilation included) and their ratio. Run it on an idle machine.

    PYTHONPATH=. python scripts/bench_members.py --model cnn --members 5 --steps 200
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
from hydra import compose, initialize_config_dir

from bnn_bench.config import build
from bnn_bench.models import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn", help="model config choice")
    ap.add_argument("--members", type=int, default=5, help="K")
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps per member")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=[
                "dataset=synthetic",
                f"model={args.model}",
                "dataset.train_size=4096",
                "dataset.val_fraction=0",
                f"trainer.batch_size={args.batch_size}",
                f"trainer.steps={args.steps}",
                f"trainer.chunk_size={args.steps}",
            ],
        )
    data = build(cfg.dataset, "dataset").load()
    model = build_model(
        build(cfg.model, "model", num_classes=data.spec.num_classes), data.spec, args.model
    )
    trainer = build(cfg.trainer, "trainer")
    keys = jax.random.split(jax.random.key(0), args.members)

    def timed(fn):
        tic = time.perf_counter()
        jax.block_until_ready(fn().params)
        return time.perf_counter() - tic

    # Both paths build a fresh jitted loop per call, as a real run does, so the times
    # include compilation; the steps are many enough for the loop to dominate.
    vm = timed(lambda: trainer.train_members(keys, model, data))
    seq = sum(timed(lambda k=k: trainer.train(k, model, data)) for k in keys)
    print(f"model {args.model}, K={args.members}, {args.steps} steps of batch {args.batch_size}")
    print(f"vmapped    : {vm:.1f}s")
    print(f"one by one : {seq:.1f}s")
    print(f"ratio (one by one / vmapped): {seq / vm:.2f}")


if __name__ == "__main__":
    main()
