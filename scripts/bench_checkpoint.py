"""Measures checkpoint save and restore time for a model's full training state.

    python scripts/bench_checkpoint.py --model mobilenet --shape 32 32 3 --repeats 5

The state is what the trainer saves: parameters, batch-norm statistics and the
Adam moments (``TrainState``), written by ``bnn_bench.checkpoint.Checkpointer``
(msgpack, fsync, rename). Prints size, median save and restore seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import optax

from bnn_bench.checkpoint import Checkpointer
from bnn_bench.config import build
from bnn_bench.data.dataset import Spec
from bnn_bench.methods.training import TrainState
from bnn_bench.models import build_model, num_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet", help="a conf/model choice")
    p.add_argument("--shape", type=int, nargs=3, default=[32, 32, 3], help="H W C")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", help="where to write (default: a temporary folder)")
    args = p.parse_args()

    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={args.model}"])
    module = build(cfg.model, "model", num_classes=args.classes)
    spec = Spec(
        "bench",
        tuple(args.shape),
        args.classes,
        tuple(map(str, range(args.classes))),
        (0.5,) * args.shape[2],
        (0.25,) * args.shape[2],
        None,
    )
    model = build_model(module, spec, args.model)
    params, state = model.init(jax.random.key(0))
    ts = TrainState(params, state, optax.adam(1e-3).init(params))
    jax.block_until_ready(ts)

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        ckpt = Checkpointer(Path(d) / "loop", keep=1)
        saves, restores = [], []
        for i in range(args.repeats):
            tic = time.perf_counter()
            path = ckpt.save(i + 1, ts)
            saves.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            jax.block_until_ready(Checkpointer(Path(d) / "loop").restore(ts))
            restores.append(time.perf_counter() - tic)
        size = sum(f.stat().st_size for f in path.iterdir())
    print(
        f"{args.model} {tuple(args.shape)}: {num_params(params):,} parameters, checkpoint "
        f"{size / 2**20:.1f} MiB; save {statistics.median(saves):.3f}s, restore "
        f"{statistics.median(restores):.3f}s (median of {args.repeats}, {jax.devices()[0]})"
    )


if __name__ == "__main__":
    main()
