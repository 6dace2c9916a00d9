"""Run-folder files. ``metrics.json`` is written last and atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """JSON-ready: numpy scalars to floats, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, payload: dict) -> None:
    """Writes ``payload`` to ``path`` via a temporary file and a rename, so a reader
    (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(payload), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_metrics(out_dir: Path, metrics: dict[str, float], curves: dict) -> Path:
    """``metrics.json``: flat ``{name: number}`` plus ``curves``."""
    path = Path(out_dir) / "metrics.json"
    write_json_atomic(path, {**metrics, "curves": curves})
    return path


def read_metrics(out_dir: Path) -> dict[str, float]:
    """The flat metrics of a finished run's ``metrics.json`` (without ``curves``)."""
    payload = json.loads((Path(out_dir) / "metrics.json").read_text())
    return {k: v for k, v in payload.items() if k != "curves"}
