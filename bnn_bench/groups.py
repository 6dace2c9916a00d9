"""Config groups that only some methods compose: a method is never handed one it ignores.

The trainer group (``trainer.*``) is composed by the YAMLs of the methods that train a
network (``defaults: [/trainer@_global_.trainer: default]``), so the samplers never see
it. A ``trainer.*`` override with a sampler would stop in Hydra with "Key 'trainer' is
not in struct"; ``check_overrides`` finds that case before Hydra composes and names
the key that works instead. ``check_composed`` refuses a trainer node that reached a
method without one some other way (``+trainer...``, a preset).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bnn_bench.errors import UserError

GROUP = "trainer"
# trainer key -> the sampler's key of the same meaning
SAMPLER_KEYS = {
    "epochs": "epochs",
    "steps": "iterations",
    "batch_size": "batch_size",
    "chunk_size": "chunk_size",
    "schedule": "step_size",
}


def training_methods(config_dir: str | Path) -> list[str]:
    """The method choices whose YAML composes the trainer group."""
    names = []
    for path in sorted(Path(config_dir, "method").glob("*.yaml")):
        defaults = OmegaConf.load(path).get("defaults") or []
        entries = [next(iter(e)) if isinstance(e, DictConfig) else str(e) for e in defaults]
        if any(entry.startswith(f"/{GROUP}") for entry in entries):
            names.append(path.stem)
    return names


def _message(key: str, value: str | None, method: str, cfg: DictConfig, config_dir) -> str:
    msg = (
        f"{key}: method={method} does not train a network, so it has no {GROUP} group "
        f"({GROUP}.* applies to method={'|'.join(training_methods(config_dir))})."
    )
    parts = key.split(".")
    own = SAMPLER_KEYS.get(parts[1]) if len(parts) > 1 else None
    if own is not None and own in cfg.method:
        same = len(parts) == 2 and value is not None and own != "step_size"
        msg += f" Its own key is method.{own}" + (f": method.{own}={value}." if same else ".")
    return msg


def check_composed(cfg: DictConfig) -> None:
    """Refuses a trainer node in ``cfg`` when ``cfg.method`` does not use it.

    Raises:
      UserError: naming the group and the method.
    """
    if GROUP in cfg and "method" in cfg and GROUP not in cfg.method:
        method = cfg.method.get("_target_", "the method")
        raise UserError(
            f"{GROUP}: {method} does not train a network and would ignore the {GROUP} "
            f"keys; remove them (its own keys are under method.*)."
        )


def check_overrides(args: Sequence[str], config_dir: str | Path) -> None:
    """Refuses command-line ``trainer.*`` overrides for a method without a trainer.

    ``args`` are the command's arguments (Hydra's flags are skipped). With a sweep over
    ``method`` or ``experiment``, every combination is checked.

    Raises:
      UserError: naming the key, the method, and the method's own key of the same meaning.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except Exception:  # noqa: BLE001 - a malformed override is Hydra's to report
        return
    ours = [o for o in overrides if o.key_or_group.split(".")[0].split("/")[0] == GROUP]
    if not ours:
        return
    fixed, swept = [], []
    for o in overrides:
        if o in ours or o.key_or_group.startswith("hydra"):
            continue
        if not o.is_sweep_override():
            fixed.append(o.input_line)
        elif o.key_or_group in ("method", "experiment"):
            swept.append([f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()])
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        for combo in itertools.product(*swept):
            try:
                cfg = compose("config", [*fixed, *combo], return_hydra_config=True)
            except Exception:  # noqa: BLE001 - Hydra reports its own composition errors
                continue
            if GROUP not in cfg:
                method = cfg.hydra.runtime.choices.method
                o = ours[0]
                value = o.value() if not o.is_sweep_override() else None
                value = None if value is None else str(value)
                raise UserError(_message(o.key_or_group, value, method, cfg, config_dir))
