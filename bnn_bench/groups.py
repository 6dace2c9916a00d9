"""Config groups that only some methods compose: a method is never handed one it ignores.

The trainer group (``trainer.*``) is composed by the YAMLs of the methods that train a
network (``defaults: [/trainer@_global_.trainer: default]``), so the samplers never see
it. A ``trainer.*`` override with a sampler would stop in Hydra with "Key 'trainer' is
not in struct"; ``check_overrides`` finds that case before Hydra composes and names
the key that works instead. ``check_composed`` refuses a trainer node that reached a
method without one some other way (``+trainer...``, a preset).

``check_overrides`` also composes a command's configs before Hydra does (every
combination of the groups it sweeps) and refuses, in one line, what Hydra would not
apply as asked: a key some or all of the composed configs lack (naming the choices
without it, and a key that exists), and a group choice whose node a preset's settings
would replace. ``help_groups`` lists the groups and their choices for ``--help``.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def _takes(node: DictConfig, key: str) -> bool:
    """Whether ``node`` or a mapping inside it (``method.base`` of ``method=multi``) has
    ``key``."""
    return key in node or any(
        isinstance(node._get_node(k), DictConfig) and _takes(node._get_node(k), key) for k in node
    )


def check_composed(cfg: DictConfig) -> None:
    """Refuses a trainer node in ``cfg`` when no node of ``cfg.method`` uses it.

    Raises:
      UserError: naming the group and the method.
    """
    if GROUP in cfg and "method" in cfg and not _takes(cfg.method, GROUP):
        method = cfg.method.get("_target_", "the method")
        raise UserError(
            f"{GROUP}: {method} does not train a network and would ignore the {GROUP} "
            f"keys; remove them (its own keys are under method.*)."
        )


def _is_group(key: str, config_dir: str | Path) -> bool:
    return Path(config_dir, key).is_dir()


def _missing(cfg: DictConfig, key: str) -> tuple[str, str, list[str]] | None:
    """None if the dotted ``key`` is in ``cfg`` (or a node on its way is not a mapping,
    which Hydra reports itself); else (the mapping that lacks it, the part it lacks, the
    mapping's keys)."""
    node, path = cfg, []
    for part in key.split("."):
        if not isinstance(node, DictConfig) or node._is_missing() or node._is_none():
            return None
        if part not in node:
            return ".".join(path), part, [str(k) for k in node if not str(k).startswith("_")]
        node, path = node._get_node(part), [*path, part]
    return None


def _unknown_key(key: str, line: str, gaps: dict[str, tuple], good: list[str]) -> str:
    """One line for an override whose key the configs of some choices (``gaps``: the
    choices -> what ``_missing`` found) lack; ``good``: the choices that have it."""
    bad = list(gaps)
    near = {}  # a close key -> the choices that have it
    for choice, (where, part, known) in gaps.items():
        for k in difflib.get_close_matches(part, known, n=1):
            near.setdefault(".".join(filter(None, [where, k])), []).append(choice)
    everywhere = len(near) == 1 and len(next(iter(near.values()), [])) == len(bad)
    hint = "".join(
        f" Did you mean {k}{'' if everywhere else ' (' + ', '.join(c) + ')'}?"
        for k, c in near.items()
    )
    verb = lambda c: "has" if len(c) == 1 else "have"  # noqa: E731
    if good:
        return (
            f"{key}: {' and '.join(bad)} {verb(bad)} no such key ({' and '.join(good)} "
            f"{verb(good)} it).{hint} Launch the jobs apart: {_choices(good)} {line}, and "
            f"{_choices(bad)} without it."
        )
    where, part, known = next(iter(gaps.values()))
    if len(bad) > 1:
        return f"Unknown key {key} (for {', '.join(bad)}).{hint}"
    return (
        f"Unknown key {key}: {where or 'the config'} has no {part!r}"
        f"{' (' + bad[0] + ')' if bad[0] else ''}.{hint} Its keys: {', '.join(sorted(known))}."
    )


def _choices(combos: list[str]) -> str:
    """``method=psgld,sgld`` for [method=psgld, method=sgld]; else the combinations."""
    groups = {c.split("=", 1)[0] for c in combos}
    if len(groups) == 1 and all(" " not in c for c in combos):
        return f"{groups.pop()}={','.join(c.split('=', 1)[1] for c in combos)}"
    return " | ".join(combos)


def _label(combo: tuple[str, ...], others: list[tuple[str, ...]]) -> str:
    """The choices of ``combo`` that no combination in ``others`` has (the whole combo
    if there are none): what sets it apart."""
    seen = {c for other in others for c in other}
    return " ".join([c for c in combo if c not in seen] or combo)


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


def _check_preset(cfg: DictConfig, given: list[str], compose: Any, config_dir) -> None:
    """Refuses a group chosen on the command line whose node a preset replaced (e.g. a
    fixed ``method.prior_precision`` over ``method/laplace/prior_precision=marglik``) or
    gave keys the chosen option does not take. A preset's settings of a group it chooses
    belong in ``conf/experiment/<preset>/<group>/<choice>.yaml`` (``conf/config.yaml``),
    which a user's choice replaces together with the preset's."""
    choices = cfg.hydra.runtime.choices
    preset = choices.get("experiment")
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
        ref = compose("config", [*(f"{g}={c}" for g, c in groups.items()), *pinned])
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


def check_overrides(args: Sequence[str], config_dir: str | Path) -> None:
    """Refuses command-line overrides that the composed config would not apply, before
    Hydra starts: keys the config does not have (Hydra would stop with "Key ... is not
    in struct"), and a group choice that a preset's settings would replace.

    ``args`` are the command's arguments (Hydra's flags are skipped). With a sweep over
    config groups (``method=map,sgld``, ``model=mlp,lenet``), every combination is
    composed and checked: a key that some methods have and others not is named with the
    choices that lack it. ``trainer.*`` for a method that does not train names the
    method's own key of the same meaning.

    Raises:
      UserError: naming the key or group, the choices or preset in the way, and what
        works instead.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except Exception:  # noqa: BLE001 - a malformed override is Hydra's to report
        return
    plain = [
        o
        for o in overrides
        if not (o.is_add() or o.is_delete() or o.is_force_add())
        and not o.key_or_group.startswith("hydra")
    ]
    keys = [
        o
        for o in plain
        if o.package is None and "." in o.key_or_group and not _is_group(o.key_or_group, config_dir)
    ]
    groups = [o for o in plain if o not in keys and _is_group(o.key_or_group, config_dir)]
    with_preset = any(o.key_or_group == "experiment" for o in overrides)
    if not keys and not (with_preset and len(groups) > 1):
        return
    fixed, swept = [], []
    for o in overrides:
        if o in keys or o.key_or_group.startswith("hydra"):
            continue
        if not o.is_sweep_override():
            fixed.append(o.input_line)
        elif _is_group(o.key_or_group.split("@")[0], config_dir):
            swept.append([f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()])
    chosen = {o.key_or_group for o in groups if o.package is None}
    composed = []
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        for combo in itertools.product(*swept):
            try:
                cfg = compose("config", [*fixed, *combo], return_hydra_config=True)
            except Exception:  # noqa: BLE001 - Hydra reports its own composition errors
                continue
            composed.append((combo, cfg))
            given = [o for o in [*fixed, *combo] if o.split("=", 1)[0] in chosen]
            _check_preset(cfg, given, compose, config_dir)
    for o in keys:
        key = o.key_or_group
        if any(key.startswith(k.key_or_group + ".") for k in keys):
            continue  # another override sets a node above it: Hydra judges the two
        good, gaps = [], {}
        for combo, cfg in composed:
            if key.split(".")[0] == GROUP and GROUP not in cfg and "method" in cfg:
                value = None if o.is_sweep_override() else str(o.value())
                method = cfg.hydra.runtime.choices.method
                raise UserError(_message(key, value, method, cfg, config_dir))
            missing = _missing(cfg, key)
            if missing is None:
                good.append(combo)
            else:
                gaps[combo] = missing
        if gaps:
            labelled = {_label(c, good): gap for c, gap in gaps.items()}
            have = list(dict.fromkeys(_label(c, list(gaps)) for c in good))
            raise UserError(_unknown_key(key, o.input_line, labelled, have))


def help_groups() -> str:
    """The config groups and their choices, for ``--help`` (an OmegaConf resolver that
    ``conf/config.yaml``'s help template calls): the app's groups, without the presets'
    per-method and per-choice files (``experiment/<preset>/...``), and Hydra's launchers
    and sweepers (``hydra/launcher``, ``hydra/sweeper``)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    loader = GlobalHydra.instance().config_loader()
    lines: dict[str, str] = {}

    def walk(parent: str) -> None:
        for name in sorted(loader.list_groups(parent)):
            group = f"{parent}/{name}" if parent else name
            if group.startswith("experiment/") or (
                group.startswith("hydra/") and group not in HYDRA_GROUPS
            ):
                continue
            options = sorted(loader.get_group_options(group, ObjectType.CONFIG))
            if options and group != "hydra":
                lines[group] = f"{group}: {', '.join(options)}"
            walk(group)

    walk("")
    return "".join(lines[g] + "\n" for g in sorted(lines, key=lambda g: (g[:6] == "hydra/", g)))


HYDRA_GROUPS = ("hydra/launcher", "hydra/sweeper")  # the Hydra groups --help lists
