"""The ``bnn-bench`` command: Hydra composes the config, ``run`` does the work."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bnn_bench.errors import UserError
from bnn_bench.run import run

_HERE = Path(__file__).resolve().parent
# An installed wheel carries conf/ inside the package; a source checkout has it beside.
CONF = str(_HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf")


@hydra.main(version_base=None, config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> float | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = run(cfg, out_dir)
    except UserError as e:
        for handler in logging.getLogger().handlers:  # keep the reason in run.log too
            if isinstance(handler, logging.FileHandler):
                handler.emit(logging.makeLogRecord(
                    {"name": "bnn_bench", "levelno": logging.ERROR, "levelname": "ERROR",
                     "msg": str(e)}))
        print(f"bnn-bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("test/acc")


if __name__ == "__main__":
    main()
