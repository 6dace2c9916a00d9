"""The ``bnn-bench`` command: Hydra composes the config, ``run`` does the work."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from bnn_bench.checkpoint import Preempted
from bnn_bench.errors import UserError
from bnn_bench.groups import check_overrides
from bnn_bench.run import run

_HERE = Path(__file__).resolve().parent
# An installed wheel carries conf/ inside the package; a source checkout has it beside.
CONF = str(_HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf")

log = logging.getLogger("bnn_bench")


def configure_device(device: DictConfig) -> dict[str, str]:
    """Sets XLA's GPU memory variables from ``device``; they only take effect before
    JAX starts its backend, which nothing has done yet when the CLI calls this."""
    from jax._src import xla_bridge

    env = {}
    if device.preallocate is not None:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true" if device.preallocate else "false"
    if device.mem_fraction is not None:
        if not 0 < float(device.mem_fraction) <= 1:
            raise UserError(f"device.mem_fraction must be in (0, 1]; got {device.mem_fraction}.")
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(float(device.mem_fraction))
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if changed and xla_bridge.backends_are_initialized():
        log.warning("device settings %s come too late: JAX has started already.", changed)
    os.environ.update(env)
    if env:
        log.info("device: %s", " ".join(f"{k}={v}" for k, v in env.items()))
    return env


def _error(message: str) -> None:
    for handler in logging.getLogger().handlers:  # keep the reason in run.log too
        if isinstance(handler, logging.FileHandler):
            handler.emit(
                logging.makeLogRecord(
                    {
                        "name": "bnn_bench",
                        "levelno": logging.ERROR,
                        "levelname": "ERROR",
                        "msg": message,
                    }
                )
            )
    print(f"bnn-bench: {message}", file=sys.stderr)


@hydra.main(version_base=None, config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    try:
        configure_device(cfg.device)
        metrics = run(cfg, out_dir)
    except UserError as e:
        _error(f"error: {e}")
        sys.exit(2)
    except Preempted as e:
        if hc.mode == RunMode.MULTIRUN:
            again = f"re-launch the same command with hydra.sweep.dir={hc.sweep.dir}"
        else:
            again = f"bnn-bench {' '.join(hc.overrides.task)} hydra.run.dir={out_dir}"
        _error(f"{e}. To continue: {again}")
        sys.exit(128 + e.signum)
    return metrics.get("test/acc")


def entry() -> None:
    """The ``bnn-bench`` command: refuses ``trainer.*`` overrides for a method that does
    not train (Hydra would stop with "Key 'trainer' is not in struct" before ``main``),
    then runs ``main``."""
    try:
        check_overrides(sys.argv[1:], CONF)
    except UserError as e:
        print(f"bnn-bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    entry()
