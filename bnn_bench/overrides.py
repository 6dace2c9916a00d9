"""Why Hydra refused a command's override: one line naming the key, the choices that
lack it, and a key that exists; or, for a key renamed to the glossary's name
(``config.RENAMED``), the key's new name.

Hydra composes first (a sweep's every job, before it launches any); only when it fails
with "Could not override ..." does ``explain`` compose the command's combinations again
(without the key overrides) to say which of them lack the key and what is close to it.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bnn_bench.config import renamed
from bnn_bench.errors import UserError


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
            known = [str(k) for k in node if not str(k).startswith("_") and k != "hydra"]
            return ".".join(path), part, known
        node, path = node._get_node(part), [*path, part]
    return None


def _near(cfg: DictConfig, key: str, gap: tuple[str, str, list[str]]) -> str | None:
    """A key of ``cfg`` close to ``key``: a close name where it is missing, or (for a
    top-level node the config lacks, e.g. a group this method does not compose) the
    same key under another top-level node (``trainer.epochs`` -> ``method.epochs``)."""
    where, part, known = gap
    close = difflib.get_close_matches(part, known, n=1)
    if close:
        return ".".join(filter(None, [where, close[0]]))
    rest = key.split(".", 1)[1] if not where and "." in key else None
    for top in known if rest else []:
        if isinstance(cfg.get(top), DictConfig) and _missing(cfg[top], rest) is None:
            return f"{top}.{rest}"
    return None


def trainers(config_dir: str | Path) -> list[str]:
    """The method choices that train a network: their YAML, or a method YAML in their
    defaults (``laplace_kfac`` -> ``laplace``), passes ``trainer`` on (``${trainer}``)."""
    folder = Path(config_dir, "method")

    def trains(name: str, seen: tuple[str, ...] = ()) -> bool:
        path = folder / f"{name}.yaml"
        if name in seen or not path.is_file():
            return False
        if "${trainer}" in path.read_text():
            return True
        defaults = OmegaConf.load(path).get("defaults") or []
        return any(isinstance(e, str) and trains(e, (*seen, name)) for e in defaults)

    return [p.stem for p in sorted(folder.glob("*.yaml")) if trains(p.stem)]


def refuse_trainer(
    cfg: DictConfig, method: str, overrides: Sequence[str], config_dir: str | Path
) -> None:
    """Refuses a ``trainer.*`` key or ``trainer/...`` choice on the command line of a method
    that does not train (``config.without_unread_trainer`` drops the node it would set),
    naming the methods that read it and the method's own key of the same name; and of a
    post-hoc method that loads its MAP (``method.init_from``) instead of training it.

    Raises:
      UserError: ``trainer.epochs: method=sgld does not train a network ... Did you mean
        method.epochs=4?``.
    """
    from bnn_bench.config import reads_trainer, without_unread_trainer

    given = [o.lstrip("+~") for o in overrides]
    given = [
        o for o in given if o.split("=", 1)[0].split("@")[0].startswith(("trainer.", "trainer/"))
    ]
    if not given:
        return
    line = given[0]
    key = line.split("=", 1)[0]
    if reads_trainer(cfg):
        loaded = OmegaConf.select(cfg, "method.init_from", default=None)
        if loaded is None:
            return
        raise UserError(
            f"{key}: method={method} loads its MAP network from method.init_from={loaded}, "
            f"so no network is trained and no trainer.* key is read. Drop {key}, or drop "
            f"method.init_from to train the MAP here."
        )
    own = without_unread_trainer(cfg)
    hint = ""
    if "." in key and (gap := _missing(own, key)) is not None:
        near = _near(own, key, gap)
        if near is not None:
            value = line.split("=", 1)[1] if "=" in line else ""
            hint = f" Did you mean {near}{'=' + value if value else ''}?"
    raise UserError(
        f"{key}: method={method} does not train a network, so no part of it reads the "
        f"trainer group (trainer.* applies to method={'|'.join(trainers(config_dir))}).{hint}"
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


def _message(key: str, line: str, gaps: dict, near: dict, good: list[str], config_dir) -> str:
    """One line for the override ``line`` whose ``key`` the configs of some choices
    (``gaps``: label -> (where, part, known)) lack; ``near``: a close key -> the labels
    that have it; ``good``: the labels of the choices that have ``key``."""
    bad = list(gaps)
    value = line.split("=", 1)[1]
    everywhere = len(near) == 1 and len(next(iter(near.values()))) == len(bad)
    hint = "".join(
        f" Did you mean {k}{'=' + value if everywhere and ',' not in value else ''}"
        f"{'' if everywhere else ' (' + ', '.join(c) + ')'}?"
        for k, c in near.items()
    )
    where, part, known = next(iter(gaps.values()))
    if not where and _is_group(part, config_dir):
        # the one group the root config leaves out unless chosen: the presets
        choices = sorted(p.stem for p in Path(config_dir, part).glob("*.yaml"))
        hint = (
            f" {part} is chosen whole ({part}=<name>: {', '.join(choices)}) and has no keys "
            "of its own; override the keys a preset sets where they live (e.g. "
            "trainer.epochs)." + hint
        )
    verb = lambda c: "has" if len(c) == 1 else "have"  # noqa: E731
    if good:
        return (
            f"{key}: {' and '.join(bad)} {verb(bad)} no such key ({' and '.join(good)} "
            f"{verb(good)} it).{hint} Launch the jobs apart: {_choices(good)} {line}, and "
            f"{_choices(bad)} without it."
        )
    if len(bad) > 1:
        return f"Unknown key {key} (for {', '.join(bad)}).{hint}"
    return (
        f"Unknown key {key}: {where or 'the config'} has no {part!r}"
        f"{' (' + bad[0] + ')' if bad[0] else ''}.{hint} "
        + (f"Its keys: {', '.join(sorted(known))}." if known else "It takes no keys.")
    )


def _renamed(key: str, line: str, gaps: dict) -> str | None:
    """``config.renamed``'s message when ``key`` is an old name that every config lacking it
    (``gaps``: choices -> (where, part, known)) has a new name for; where the choices'
    new names differ, one message per choice."""
    value = line.split("=", 1)[1]
    messages = {}
    for combo, (where, part, known) in gaps.items():
        whole = ".".join(filter(None, [where, part])) == key
        message = renamed(key, known, value) if whole else None
        if message is None:
            return None
        messages[" ".join(combo)] = message
    if len(set(messages.values())) == 1:
        return next(iter(messages.values()))
    return " ".join(f"{m[:-1]} ({c})." for c, m in messages.items())


def _composed(args: Sequence[str], keys: list, config_dir: str | Path) -> list:
    """(choices, config) of every combination of the groups ``args`` sweeps, composed
    without the ``keys`` overrides; the choices include the method's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fixed, swept = [], []
    for o in OverridesParser.create().parse_overrides(list(args)):
        if o in keys or o.key_or_group.startswith("hydra"):
            continue
        if not o.is_sweep_override():
            fixed.append(o.input_line)
        elif _is_group(o.key_or_group.split("@")[0], config_dir):
            swept.append([f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()])
    composed = []
    GlobalHydra.instance().clear()  # Hydra's own instance, from the failed composition
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        for combo in itertools.product(*swept):
            try:
                cfg = compose("config", [*fixed, *combo], return_hydra_config=True)
            except Exception:  # noqa: BLE001 - another problem: Hydra's message stands
                continue
            method = f"method={cfg.hydra.runtime.choices.method}"
            named = combo if any(c.startswith("method=") for c in combo) else (*combo, method)
            composed.append((named, cfg))
    return composed


def explain(args: Sequence[str], config_dir: str | Path) -> str | None:
    """One line for a command whose composition failed on an override key that some or
    all of the composed configs lack (Hydra's "Could not override"); None when the
    failure is something else (Hydra's own message then stands).

    ``args`` are the command's arguments (Hydra's flags are skipped). With a sweep over
    config groups (``method=map,sgld``), every combination is composed: the line names
    the choices that lack the key, those that have it, and a close key that exists.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except Exception:  # noqa: BLE001 - a malformed override is Hydra's to report
        return None
    keys = [
        o
        for o in overrides
        if not (o.is_add() or o.is_delete() or o.is_force_add())
        and o.package is None
        and "." in o.key_or_group
        and not o.key_or_group.startswith("hydra")
        and not _is_group(o.key_or_group, config_dir)
    ]
    if not keys:
        return None
    composed = _composed(lines, keys, config_dir)
    for o in keys:
        key = o.key_or_group
        if any(key.startswith(k.key_or_group + ".") for k in keys):
            continue  # another override sets a node above it: Hydra judges the two
        good = [c for c, cfg in composed if _missing(cfg, key) is None]
        gaps = {c: (cfg, gap) for c, cfg in composed if (gap := _missing(cfg, key)) is not None}
        if not gaps:
            continue
        message = _renamed(key, o.input_line, {c: gap for c, (_, gap) in gaps.items()})
        if message is not None:
            return message
        near: dict[str, list[str]] = {}
        labelled = {}
        for combo, (cfg, gap) in gaps.items():
            label = _label(combo, good)
            labelled[label] = gap
            close = _near(cfg, key, gap)
            if close is not None:
                near.setdefault(close, []).append(label)
        have = list(dict.fromkeys(_label(c, list(gaps)) for c in good))
        return _message(key, o.input_line, labelled, near, have, config_dir)
    return None
