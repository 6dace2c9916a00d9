"""Measures how far healthy runs stay below the divergence bound of the chunked loop.

For each configuration, runs it (``bnn_bench.run.run``) and records, for every loop
that checks a training loss (trainer, vi, swag's SGD phase, SG-MCMC), the largest
chunk loss divided by the bound ``LOSS_BOUND x log C`` (``methods/loop.py``). A
ratio below 1 does not trip the check; the margin is how far below 1 it stays.

    PYTHONPATH=. python scripts/divergence_margin.py --out outputs/margin
    PYTHONPATH=. python scripts/divergence_margin.py --out outputs/margin \\
        "method=map dataset=synthetic trainer.schedule.init_value=1e3"

Without configurations it runs its default list: every method that trains, with its
defaults on ``dataset=synthetic``, then the presets (on Fashion-MNIST, the data this
machine has, shortened to their first steps, where a healthy loss is highest).
"""

from __future__ import annotations

import argparse
import collections
import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir

from bnn_bench.errors import UserError
from bnn_bench.methods import loop
from bnn_bench.run import run

CONF = Path(__file__).resolve().parents[1] / "conf"
SHORT_SAMPLER = (
    "method.steps=300 method.epochs=null method.burn_in=150 method.burn_in_epochs=null "
    "method.members_per_chain=10 method.chunk_size=20"
)
SHORT = "trainer.steps=300 trainer.chunk_size=20"
DEFAULTS = [
    *(
        f"method={m} dataset=synthetic"
        for m in ("map", "ensemble", "vote", "swag", "vi", "temperature", "laplace")
    ),
    "method=laplace_kfac dataset=synthetic",
    "method=mc_dropout dataset=synthetic model.dropout_rate=0.1",
    "method=mcbn dataset=synthetic model=lenet model.norm=batchnorm",
    # the samplers' defaults take 45 post-burn-in steps on it: 20 samples of them
    *(
        f"method={m} dataset=synthetic method.members_per_chain=20"
        for m in ("sgld", "psgld", "sghmc")
    ),
    f"experiment=tu_mc_dropout dataset=fashion_mnist {SHORT}",
    f"experiment=tu_mnist_mcbn dataset=fashion_mnist {SHORT}",
    f"experiment=capsa_mnist_vote dataset=fashion_mnist {SHORT}",
    f"experiment=laplax_mnist dataset=fashion_mnist method=map {SHORT}"  # its MAP: the trainer,
    f"experiment=laplace_redux method=map {SHORT}",
    f"method=swag dataset=fashion_mnist {SHORT} method.sgd.epochs=2 method.sgd.chunk_size=20",
    f"method=vi dataset=fashion_mnist {SHORT}",
    f"experiment=blackjax_mnist_sgld dataset=fashion_mnist {SHORT_SAMPLER}",
    f"experiment=blackjax_mnist_sghmc dataset=fashion_mnist {SHORT_SAMPLER}",
    f"method=psgld dataset=fashion_mnist {SHORT_SAMPLER}",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="overrides of one run, space-separated")
    parser.add_argument("--out", type=Path, default=Path("outputs/margin"))
    args = parser.parse_args()

    worst: dict[str, float] = collections.defaultdict(float)
    check = loop.Divergence.check

    def recording(self, carry, values):
        if self.loss is not None:
            ratio = float(self.loss(carry, values)) / self.bound
            worst[current] = max(worst[current], ratio)
        return check(self, carry, values)

    loop.Divergence.check = recording
    rows = []
    for i, overrides in enumerate(args.configs or DEFAULTS):
        current = overrides
        out = args.out / f"{i:02d}"
        shutil.rmtree(out, ignore_errors=True)
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            cfg = compose(config_name="config", overrides=overrides.split())
        try:
            run(cfg, out)
            outcome = "ok"
        except UserError as e:
            outcome = f"UserError: {e}"
        rows.append((worst[overrides], overrides, outcome))
        print(f"{worst[overrides]:8.3f}  {overrides}  {outcome}", flush=True)
    print(f"\nlargest chunk loss / bound ({loop.LOSS_BOUND:g} x log C):")
    for ratio, overrides, outcome in rows:
        print(f"{ratio:8.3f}  {overrides}  {outcome[:80]}")


if __name__ == "__main__":
    main()
