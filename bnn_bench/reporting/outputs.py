"""Run-folder files. Every file is written atomically; ``metrics.json`` last."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from bnn_bench.run_folder import HYDRA, HYDRA_CONFIG, METRICS


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


def _temporary(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` (its descriptor and name) with the mode a plain
    ``open`` gives under the user's umask (``mkstemp`` makes it 0600, and the rename
    would keep that: results others cannot read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0o022)  # read it: os.umask only reads by setting
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_json_atomic(path: Path, payload: dict) -> None:
    """Writes ``payload`` to ``path`` via a temporary file and a rename, so a reader
    (or a crash) never sees half a file."""
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(payload), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Writes ``array`` to ``path`` (``.npy``) via a temporary file and a rename."""
    fd, tmp = _temporary(Path(path))
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def config_choice(out_dir: Path | None, group: str, node: Mapping) -> str:
    """The name of the config choice of ``group`` (e.g. ``mobilenet`` for ``model=mobilenet``).

    Read from the choices Hydra saves in ``out_dir/.hydra/hydra.yaml`` when the run was
    launched by Hydra; else (``run`` called directly, or ``out_dir`` None: the dry run,
    which writes nothing) the shipped choice of ``group`` whose
    YAML has the node's ``_target_`` and values (``wrn16_4`` and ``wrn`` share a target),
    or failing that the module of the ``_target_``
    (``bnn_bench.models.mobilenet.MobileNetV1`` -> ``mobilenet``).
    """
    path = Path(out_dir) / HYDRA / HYDRA_CONFIG if out_dir is not None else None
    if path is not None and path.is_file():
        choice = OmegaConf.select(OmegaConf.load(path), f"hydra.runtime.choices.{group}")
        if choice:
            return str(choice)
    if shipped := _shipped_choice(group, node):
        return shipped
    parts = str(node.get("_target_", "")).split(".")
    return parts[-2] if len(parts) > 1 else parts[0]


def _shipped_choice(group: str, node: Mapping) -> str | None:
    """The first ``conf/<group>/<choice>.yaml`` whose every key equals the node's."""
    from bnn_bench.cli import CONF

    for yaml in sorted((Path(CONF) / group).glob("*.yaml")):
        own = OmegaConf.to_container(OmegaConf.load(yaml))
        same_target = isinstance(own, dict) and own.get("_target_") == node.get("_target_")
        if same_target and all(node.get(k) == v for k, v in own.items() if k != "defaults"):
            return yaml.stem
    return None


def write_metrics(out_dir: Path, metrics: dict[str, float], curves: dict) -> Path:
    """``metrics.json``: flat ``{name: number}`` plus ``curves``."""
    path = Path(out_dir) / METRICS
    write_json_atomic(path, {**metrics, "curves": curves})
    return path


def read_metrics(out_dir: Path) -> dict[str, float]:
    """The flat metrics of a finished run's ``metrics.json`` (without ``curves``).

    Raises:
      UserError: naming the file, when it is not a JSON object.
    """
    from bnn_bench.errors import UserError

    path = Path(out_dir) / METRICS
    try:
        payload = json.loads(path.read_text())
    except ValueError as e:  # bad JSON, bytes that are not UTF-8
        payload, reason = None, f"{type(e).__name__}: {e}"
    else:
        reason = "not a JSON object"
    if not isinstance(payload, dict):
        raise UserError(
            f"{path} is unreadable ({reason}): the run's results are damaged. To run the "
            f"job again, delete the file (or run it with resume=false)."
        )
    return {k: v for k, v in payload.items() if k != "curves"}
