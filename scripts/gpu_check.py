"""GPU check: the JaxSGMC CIFAR-10 preset's shape on synthetic CIFAR-shaped data, timed.

Runs the code ``bnn-bench`` runs (``bnn_bench.run.run``), items 1-4 in this process:

  1. pSGLD exactly as ``experiment=jaxsgmc_cifar10_psgld`` configures it (MobileNetV1
     without batch norm, inputs resized to 112x112, batch 256, prior scale 10), on
     synthetic 32x32x3 data of CIFAR-10's size, for ``--steps`` steps: warm-up and
     sampling steps/s as the sampler measures them (compilation excluded);
  2. a bare jitted ``value_and_grad`` of the same potential (``make_log_density``) in
     ``lax.scan`` over the same batches: the limit a sampler step can approach;
  3. the MAP CNN (``method=map model=cnn``, batch 128, 32x32x3) and a 5-member vmapped
     ensemble of it (``method=ensemble``): training steps/s from the run's history
     (time between the first and the last logged chunk, so compilation is excluded);
  4. peak device memory (``cost/peak_device_mib``; the CPU backend reports none);
  5. ResNet-20-FRN (``model=resnet20_frn``) and WRN-28-10 (``model=wrn``) MAP training at
     batch 128 on the same data, each a ``bnn-bench`` run in a process of its own (before
     this one takes the device), so each peak memory is that model's: steps/s from the
     run's history, peak device MiB from its metrics.json. ``--tiny`` narrows them by
     their own keys (ResNet-8 of width 4, WRN-10-1).

  PYTHONPATH=. python scripts/gpu_check.py                 # full size, on a GPU
  PYTHONPATH=. python scripts/gpu_check.py --tiny          # small, on the CPU (a test runs it)
  PYTHONPATH=. python scripts/gpu_check.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
from hydra import compose, initialize_config_dir

from bnn_bench.config import build
from bnn_bench.data import SyntheticDataset
from bnn_bench.methods.sampling.kernels import make_log_density
from bnn_bench.models import build_model
from bnn_bench.reporting.cost import peak_device_bytes
from bnn_bench.run import run

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

SIZES = {  # full: CIFAR-10's shape; tiny: a CPU smoke run of the same code
    "full": dict(
        train=50_000, test=10_000, resize=112, width=1.0, batch=None, steps=300, burn=200, chunk=50
    ),
    "tiny": dict(train=256, test=32, resize=32, width=0.25, batch=32, steps=12, burn=8, chunk=4),
}


# The residual networks of item 5: the model's overrides at full size and at tiny size.
RESIDUAL = {
    "resnet20_frn": (["model=resnet20_frn"], ["model.depth=8", "model.width=4"]),
    "wrn28_10": (
        ["model=wrn", "model.depth=28", "model.width=10"],
        ["model.depth=10", "model.width=1"],
    ),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke run")
    p.add_argument("--steps", type=int, default=None, help="pSGLD steps (default 300; tiny 12)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args()


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def data_overrides(size: dict, resize: int | None) -> list[str]:
    out = [
        "dataset=synthetic",
        "dataset.shape=[32,32,3]",
        f"dataset.train_size={size['train']}",
        f"dataset.test_size={size['test']}",
        "eval.plots=false",
        "logger=none",
    ]
    return out + ([f"dataset.resize=[{resize},{resize}]"] if resize else [])


def psgld_overrides(size: dict, steps: int) -> list[str]:
    burn = min(size["burn"], steps - 2) if steps < 3 * size["burn"] else size["burn"]
    return [
        "experiment=jaxsgmc_cifar10_psgld",
        *data_overrides(size, size["resize"]),
        "~dataset.mean",  # the preset's CIFAR-10 keys that synthetic data does not take
        "~dataset.std",
        f"model.width_multiplier={size['width']}",
        "method.epochs=null",
        "method.burn_in_epochs=null",
        f"method.steps={steps}",
        f"method.burn_in={burn}",
        "method.members_per_chain=2",
        f"method.chunk_size={size['chunk']}",
        *([f"method.batch_size={size['batch']}"] if size["batch"] else []),  # preset: 256
    ]


def bare_gradient_rate(cfg, steps: int) -> float:
    """Steps/s of ``value_and_grad`` of the preset's potential in ``lax.scan`` (no sampler)."""
    data = SyntheticDataset(**{k: v for k, v in cfg.dataset.items() if k != "_target_"}).load()
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(module, data.spec, "mobilenet")
    log_density = make_log_density(model, data.train.size, cfg.method.prior_scale)
    params, _ = model.init(jax.random.key(0))
    b, n = cfg.method.batch_size, data.train.size
    grad = jax.value_and_grad(log_density)

    @jax.jit
    def scan(params, key, x, y):
        def body(p, k):
            idx = jax.random.randint(k, (b,), 0, n)
            value, g = grad(p, x[idx], y[idx])
            return jax.tree.map(lambda a, da: a + 1e-9 * da, p, g), value

        return jax.lax.scan(body, params, jax.random.split(key, steps))

    args = (params, jax.random.key(1), data.train.x, data.train.y)
    jax.block_until_ready(scan(*args))  # compile and warm up
    tic = time.perf_counter()
    jax.block_until_ready(scan(*args))
    return steps / (time.perf_counter() - tic)


def history_rate(out_dir: Path) -> float:
    """Training steps/s between the first and the last logged chunk of a run."""
    rows = [json.loads(line) for line in (out_dir / "history.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    if len(rows) < 2:
        raise SystemExit(f"{out_dir}: fewer than two logged chunks; raise --steps.")
    return (rows[-1]["step"] - rows[0]["step"]) / (rows[-1]["time"] - rows[0]["time"])


def train_overrides(size: dict, steps: int) -> list[str]:
    """MAP training on the synthetic CIFAR-shaped data, for ``steps`` steps at batch 128
    (tiny: its batch), logged every ``chunk`` steps, no evaluation during training."""
    return [
        "method=map",
        *data_overrides(size, None),
        f"trainer.steps={steps}",
        f"trainer.chunk_size={size['chunk']}",
        "trainer.eval_every=0",
        *([f"trainer.batch_size={size['batch']}"] if size["batch"] else []),  # default 128
    ]


def residual_figures(size: dict, steps: int, tiny: bool, tmp: Path) -> dict[str, float | str]:
    """Item 5: each residual network's MAP steps/s and peak device MiB, each from a
    ``bnn-bench`` run in its own process (a process's peak is its whole life's)."""
    figures: dict[str, float | str] = {}
    for name, (full, narrow) in RESIDUAL.items():
        out = tmp / name
        model = full + (narrow if tiny else [])
        cmd = [sys.executable, "-m", "bnn_bench.cli", *train_overrides(size, steps), *model]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        )
        proc = subprocess.run(
            [*cmd, f"hydra.run.dir={out}"], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[2:])} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads((out / "metrics.json").read_text())
        figures[f"{name}_map_steps_per_s"] = history_rate(out)
        peak = metrics.get("cost/peak_device_mib")
        figures[f"{name}_peak_device_mib"] = (
            "n/a (not reported by this backend)" if peak is None else float(peak)
        )
    return figures


def main() -> None:
    args = parse()
    size = SIZES["tiny" if args.tiny else "full"]
    steps = args.steps or size["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        residual = residual_figures(
            size, steps, args.tiny, Path(tmp)
        )  # before this process's device use
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}); sizes: {size}", flush=True)
    figures: dict[str, float | str] = {"device": device.device_kind}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(*psgld_overrides(size, steps))
        metrics = run(cfg, Path(tmp) / "psgld")
        figures["psgld_burn_in_steps_per_s"] = metrics["sampler/burn_in_steps_per_s"]
        figures["psgld_sampling_steps_per_s"] = metrics.get("sampler/sampling_steps_per_s", 0.0)
        figures["bare_value_and_grad_steps_per_s"] = bare_gradient_rate(cfg, steps)
        train = [*train_overrides(size, steps), "model=cnn"]
        run(compose_cfg(*train), Path(tmp) / "map")
        figures["map_cnn_steps_per_s"] = history_rate(Path(tmp) / "map")
        run(compose_cfg(*train, "method=ensemble", "method.members=5"), Path(tmp) / "ensemble")
        figures["ensemble5_cnn_steps_per_s"] = history_rate(Path(tmp) / "ensemble")
    peak = peak_device_bytes()
    figures["peak_device_mib"] = (
        "n/a (not reported by this backend)" if peak is None else peak / 2**20
    )
    figures.update(residual)
    ratio = figures["psgld_burn_in_steps_per_s"] / figures["bare_value_and_grad_steps_per_s"]
    print("\n".join(f"{k:34s} {v:.2f}" if isinstance(v, float) else f"{k:34s} {v}"
                    for k, v in figures.items()))  # fmt: skip
    print(f"{'psgld warm-up / bare gradient':34s} {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
