"""GPU check: the JaxSGMC CIFAR-10 preset's shape on synthetic CIFAR-shaped data, timed.

Runs in one process, through ``bnn_bench.run.run`` (the code ``bnn-bench`` runs):

  1. pSGLD exactly as ``experiment=jaxsgmc_cifar10_psgld`` configures it (MobileNetV1
     without batch norm, inputs resized to 112x112, batch 256, prior scale 10), on
     synthetic 32x32x3 data of CIFAR-10's size, for ``--steps`` steps: warm-up and
     sampling steps/s as the sampler measures them (compilation excluded);
  2. a bare jitted ``value_and_grad`` of the same potential (``make_log_density``) in
     ``lax.scan`` over the same batches: the limit a sampler step can approach;
  3. the MAP CNN (``method=map model=cnn``, batch 128, 32x32x3) and a 5-member vmapped
     ensemble of it (``method=ensemble``): training steps/s from the run's history
     (time between the first and the last logged chunk, so compilation is excluded);
  4. peak device memory (``cost/peak_device_mib``; the CPU backend reports none).

  PYTHONPATH=. python scripts/gpu_check.py                 # full size, on a GPU
  PYTHONPATH=. python scripts/gpu_check.py --tiny          # small, on the CPU (a test runs it)
  PYTHONPATH=. python scripts/gpu_check.py --json out.json
"""

from __future__ import annotations

import argparse
import json
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

CONF = Path(__file__).resolve().parents[1] / "conf"

SIZES = {  # full: CIFAR-10's shape; tiny: a CPU smoke run of the same code
    "full": dict(
        train=50_000, test=10_000, resize=112, width=1.0, batch=None, steps=300, burn=200, chunk=50
    ),
    "tiny": dict(train=256, test=32, resize=32, width=0.25, batch=32, steps=12, burn=8, chunk=4),
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


def main() -> None:
    args = parse()
    size = SIZES["tiny" if args.tiny else "full"]
    steps = args.steps or size["steps"]
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}); sizes: {size}", flush=True)
    figures: dict[str, float | str] = {"device": device.device_kind}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(*psgld_overrides(size, steps))
        metrics = run(cfg, Path(tmp) / "psgld")
        figures["psgld_burn_in_steps_per_s"] = metrics["sampler/burn_in_steps_per_s"]
        figures["psgld_sampling_steps_per_s"] = metrics.get("sampler/sampling_steps_per_s", 0.0)
        figures["bare_value_and_grad_steps_per_s"] = bare_gradient_rate(cfg, steps)
        train = [
            "method=map",
            "model=cnn",
            *data_overrides(size, None),
            f"trainer.steps={steps}",
            f"trainer.chunk_size={size['chunk']}",
            "trainer.eval_every=0",
            *([f"trainer.batch_size={size['batch']}"] if size["batch"] else []),  # default 128
        ]
        run(compose_cfg(*train), Path(tmp) / "map")
        figures["map_cnn_steps_per_s"] = history_rate(Path(tmp) / "map")
        run(compose_cfg(*train, "method=ensemble", "method.members=5"), Path(tmp) / "ensemble")
        figures["ensemble5_cnn_steps_per_s"] = history_rate(Path(tmp) / "ensemble")
    peak = peak_device_bytes()
    figures["peak_device_mib"] = (
        "n/a (not reported by this backend)" if peak is None else peak / 2**20
    )
    ratio = figures["psgld_burn_in_steps_per_s"] / figures["bare_value_and_grad_steps_per_s"]
    print("\n".join(f"{k:34s} {v:.2f}" if isinstance(v, float) else f"{k:34s} {v}"
                    for k, v in figures.items()))  # fmt: skip
    print(f"{'psgld warm-up / bare gradient':34s} {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
