"""MC-BatchNorm sweep: one MAP fit, then test metrics for several mc_batch_size / members.

Trains the network of a config once (default: the tu_mnist_mcbn preset on Fashion-MNIST),
then refits only the BatchNorm statistics (``MCBN.fit_statistics``) for every setting and
prints accuracy, NLL and ECE of the MCBN prediction, the mean NLL of its single members,
and the MAP prediction with the trained running statistics, all on the test split.

    PYTHONPATH=. python scripts/mcbn_sweep.py
    PYTHONPATH=. python scripts/mcbn_sweep.py --batch-sizes 16 64 256 --estimators 8 32 \
        -- experiment=tu_mnist_mcbn dataset=fashion_mnist seed=1
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import jax
import numpy as np
from hydra import compose, initialize_config_dir

from bnn_bench.config import build, validate
from bnn_bench.evaluation import metrics as M
from bnn_bench.models import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[16, 32, 128, 1024, 8192],
        help="mc_batch_size values",
    )
    ap.add_argument(
        "--estimators", type=int, nargs="+", default=[8, 32], help="method.members values (S)"
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        default=["experiment=tu_mnist_mcbn", "dataset=fashion_mnist"],
        help="Hydra overrides of the run to sweep (after --)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=args.overrides)
    validate(cfg)
    k_fit = jax.random.split(jax.random.key(cfg.seed))[0]  # as run.py
    data = build(cfg.dataset, "dataset").load()
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(
        module, data.spec, cfg.model._target_.rsplit(".", 1)[-1].lower(), cfg.eval.batch_size
    )
    method = build(cfg.method, "method")
    tic = time.perf_counter()
    ts = method.trainer.train(k_fit, model, data)
    print(f"trained in {time.perf_counter() - tic:.0f}s")
    x, y = data.test.x, data.test.y

    def report(name: str, probs: np.ndarray) -> None:  # probs: (S, N, C)
        mean = probs.mean(0)
        members = np.mean([M.nll(p, y) for p in probs])
        print(
            f"{name:<28} acc {M.accuracy(mean, y):.4f}  nll {M.nll(mean, y):.4f}  "
            f"ece {M.ece(mean, y):.4f}  member-nll {members:.4f}"
        )

    report("MAP (running statistics)", np.asarray(model.probs(ts.params, ts.state, x))[None])
    for s in args.estimators:
        for m in args.batch_sizes:
            if m > data.train.size:
                continue
            mc = dataclasses.replace(method, members=1 if m >= 4096 else s, mc_batch_size=m)
            post = mc.fit_statistics(
                jax.random.fold_in(k_fit, m), model, ts.params, ts.state, data.train
            )
            probs = np.exp(
                np.concatenate([np.asarray(p) for p in mc.member_log_probs(k_fit, post, x)])
            )
            report(f"MCBN S={mc.members} m={m}", probs)


if __name__ == "__main__":
    main()
