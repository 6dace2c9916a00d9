"""A group chosen on the command line beside a preset (``experiment=...``) is applied as
chosen, or the job is refused: a preset's settings must not replace the chosen node in
silence (e.g. a fixed ``method.prior_precision`` over
``method/laplace/prior_precision=marglik``). A preset's settings of a group it chooses
belong in ``conf/experiment/<preset>/<group>/<choice>.yaml`` (``conf/config.yaml``),
which a user's choice replaces together with the preset's.

``check`` runs inside the job, on the config Hydra composed; it composes a second
config (the same choices without the preset's settings) only when the command names a
preset and a group choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bnn_bench.errors import UserError


def _package(group: str, choice: str, config_dir: str | Path) -> str | None:
    """Where ``group``'s choice lands in the config: its ``# @package`` header, else the
    group's path with dots (None for ``_global_``)."""
    path = Path(config_dir, group, f"{choice}.yaml")
    head = path.read_text().splitlines()[:1] if path.is_file() else []
    if head and head[0].startswith("# @package"):
        package = head[0].split(None, 2)[2].strip()
        return None if package.startswith("_global_") else package
    return group.replace("/", ".")


def _flow(value: Any) -> str:
    """``value`` as a Hydra override value (``{a:1,b:[x,y]}``)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_flow(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def _differences(node: Any, ref: Any, path: str) -> tuple[str | None, list[str]]:
    """How ``node`` (composed with a preset) departs from ``ref`` (the same choices
    without it): the path it replaced (not a mapping, or another ``_target_``), or the
    keys it added."""
    if not isinstance(ref, DictConfig):
        return None, []
    if not isinstance(node, DictConfig) or node.get("_target_") != ref.get("_target_"):
        return path, []
    added = []
    for key in node:
        if key not in ref:
            added.append(f"{path}.{key}")
        else:
            replaced, more = _differences(node._get_node(key), ref._get_node(key), f"{path}.{key}")
            if replaced:
                return replaced, []
            added += more
    return None, added


def check(
    cfg: DictConfig,
    choices: Any,
    overrides: Sequence[str],
    compose: Callable[[list[str]], DictConfig],
    config_dir: str | Path,
) -> None:
    """Refuses a group chosen on the command line whose node a preset replaced (e.g. a
    fixed ``method.prior_precision`` over ``method/laplace/prior_precision=marglik``) or
    gave keys the chosen option does not take. A preset's settings of a group it chooses
    belong in ``conf/experiment/<preset>/<group>/<choice>.yaml`` (``conf/config.yaml``),
    which a user's choice replaces together with the preset's.

    Args:
      cfg: the job's composed config.
      choices: its group choices (``HydraConfig.get().runtime.choices``).
      overrides: the job's command-line overrides (``hydra.overrides.task``).
      compose: composes the config from a list of overrides (``hydra.compose``).
      config_dir: the folder of ``config.yaml``.

    Raises:
      UserError: naming the group choice, the preset, its setting and what works.
    """
    preset = choices.get("experiment")
    given = [
        o for o in overrides if o[0] not in "+~" and Path(config_dir, o.split("=")[0]).is_dir()
    ]
    groups = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in given}
    groups.pop("experiment", None)
    if preset is None or not groups:
        return
    # the same choices (the preset's included) without the preset's settings
    pinned = [
        f"{g}={c}"
        for g, c in choices.items()
        if c is not None and g not in groups and not g.startswith(("hydra", "experiment"))
    ]
    try:
        ref = compose([*(f"{g}={c}" for g, c in groups.items()), *pinned])
    except Exception:  # noqa: BLE001 - Hydra reports its own composition errors
        return
    for group, choice in groups.items():
        package = _package(group, choice, config_dir)
        if package is None:
            continue
        own = choices.get(f"experiment@{package}")
        if own is not None and Path(config_dir, "experiment", f"{own}.yaml").is_file():
            continue  # the preset's settings of this very choice (<preset>/<group>/<choice>)
        node, base = OmegaConf.select(cfg, package), OmegaConf.select(ref, package)
        replaced, added = _differences(node, base, package)
        source = choices.get("experiment@method") if package.startswith("method") else None
        where = f"conf/experiment/{source or preset}.yaml"
        if replaced:
            value = OmegaConf.select(cfg, replaced)
            whole = OmegaConf.to_container(OmegaConf.select(ref, replaced), resolve=False)
            raise UserError(
                f"{group}={choice}: experiment={preset} sets {replaced}="
                f"{_flow(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)} "
                f"({where}), which would replace that choice. To have it with the preset, "
                f"give the node whole: '{replaced}={_flow(whole)}'."
            )
        if added:
            raise UserError(
                f"{group}={choice}: experiment={preset} sets {', '.join(added)} ({where}), "
                f"which {group}={choice} does not take. Leave out {group}={choice} (the "
                f"preset's choice), or run it without experiment={preset}."
            )
