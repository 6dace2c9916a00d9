"""The config reference, generated from ``conf/`` and the ``_target_`` signatures.

Every group and choice of ``conf/`` (as ``--help`` lists them), every key of each choice
with its type and range (from the target's annotation: ``Annotated[int, Positive]``), its
default (the composed YAML's value) and its note (the YAML's own comment). The docs site
builds its page ``reference/config.md`` from :func:`markdown` at build time
(``docs/hooks/reference.py``), so the page cannot go stale; ``python -m
bnn_bench.reference`` prints it.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from omegaconf import DictConfig, OmegaConf

from bnn_bench.cli import CONF, NOT_CHOICES
from bnn_bench.config import _HYDRA_KEYS, _accepted, _atoms, _describe
from bnn_bench.schema import Interval, Root

# groups a run composes but that are not the app's own choices (Hydra's, the presets' files)
_SKIP_PREFIXES = ("hydra", "experiment")
_KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w]*):(.*)$")


def _yaml_file(group: str, choice: str) -> Path:
    return Path(CONF) / group / f"{choice}.yaml"


def yaml_notes(path: Path) -> dict[str, str]:
    """``{dotted key: its comment}`` from a YAML file's trailing comments (a comment alone
    on the next lines, indented past the key, continues it)."""
    notes: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last = None
    for line in path.read_text().splitlines():
        m = _KEY_LINE.match(line)
        if m is None:
            text = line.strip()
            if last and text.startswith("#") and len(line) - len(line.lstrip()) > 0:
                notes[last] = (notes.get(last, "") + " " + text.lstrip("# ")).strip()
            else:
                last = None
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
        last = ".".join(k for _, k in stack)
        if "#" in rest:
            notes[last] = rest.split("#", 1)[1].strip()
    return notes


def choice_notes(group: str, choice: str) -> dict[str, str]:
    """The notes of a choice's YAML and of the YAMLs it composes into itself (``@_here_``:
    the SG-MCMC base, ``method/base``'s methods)."""
    path = _yaml_file(group, choice)
    notes: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*-\s*(/?)([\w/]+)@_here_", line)
        if m:
            base = Path(CONF) / (m.group(2) if m.group(1) else f"{group}/{m.group(2)}")
            notes.update(yaml_notes(base.with_suffix(".yaml")))
    return notes | yaml_notes(path)


def header(path: Path) -> str:
    """The comment block a YAML file opens with (its source, command and result)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines)


def package(group: str, choice: str) -> str:
    """Where a choice's keys land in the config: its ``# @package`` line, else the group."""
    for line in _yaml_file(group, choice).read_text().splitlines()[:3]:
        if line.startswith("# @package "):
            return line.split()[-1].replace("_global_.", "")
    return group.replace("/", ".")


def _loader() -> Any:
    """Hydra's config loader; ``markdown`` initialises Hydra on ``conf/`` around its work."""
    from hydra.core.global_hydra import GlobalHydra

    return GlobalHydra.instance().config_loader()


def groups() -> dict[str, list[str]]:
    """Every app group (nested ones too, ``method/laplace/structure``) with its choices."""
    from hydra.core.object_type import ObjectType

    loader, found = _loader(), {}

    def walk(parent: str) -> None:
        for name in sorted(loader.list_groups(parent)):
            group = f"{parent}/{name}" if parent else name
            if group.startswith(_SKIP_PREFIXES) or group in NOT_CHOICES:
                continue
            options = sorted(loader.get_group_options(group, ObjectType.CONFIG))
            if options:
                found[group] = options
            walk(group)

    walk("")
    return found


@cache
def _compose(overrides: tuple[str, ...]) -> DictConfig | None:
    """The config composed with ``overrides`` (None if they do not compose together)."""
    from hydra import compose

    _loader()
    try:
        return compose("config", overrides=list(overrides), return_hydra_config=True)
    except Exception:  # noqa: BLE001 - this combination does not compose: try another
        return None


@cache
def _parents() -> dict[str, str]:
    """For a nested group, which only some choice composes (``trainer``,
    ``method/laplace/*``): the first such ``group=choice`` override (``method=laplace``)."""
    found: dict[str, str] = {}
    for group, options in groups().items():
        if "/" in group:
            continue
        for option in options:
            cfg = _compose((f"{group}={option}",))
            for chosen in cfg.hydra.runtime.choices if cfg is not None else ():
                found.setdefault(chosen, f"{group}={option}")
    return found


def composed(group: str, choice: str) -> DictConfig:
    """The config composed with ``group=choice``; for a group the default config does not
    compose, after the choice that does (``method=laplace`` for its structures)."""
    own = f"{group}={choice}"
    parent = _parents().get(group)
    if group in _compose(()).hydra.runtime.choices:
        cfg = _compose((own,))
    elif parent is None:  # a group no choice composes by default: append it
        cfg = _compose((f"+{own}",))
    else:
        cfg = _compose((parent,))
        if cfg.hydra.runtime.choices.get(group) != choice:
            cfg = _compose((parent, own))
    if cfg is None:
        raise ValueError(
            f"the config reference cannot compose {own} (alone, after {parent}, or as "
            f"+{own}); `bnn-bench --cfg job {own}` shows why."
        )
    return cfg


def _range(hint: Any) -> tuple[Any, str]:
    """(the annotation without its range, the range as text)."""
    marks = []
    for atom in _atoms(hint):
        if typing.get_origin(atom) is Annotated:
            marks += [str(m) for m in typing.get_args(atom)[1:] if isinstance(m, Interval)]
    return hint, ", ".join(dict.fromkeys(marks))


def type_text(hint: Any) -> str:
    """An annotation in words, as ``config.validate``'s messages name it."""
    words = []
    for atom in _atoms(hint):
        if typing.get_origin(atom) is Annotated:
            atom = typing.get_args(atom)[0]
        words.append("any" if atom is Any else _describe(atom, alone=len(_atoms(hint)) == 1))
    return " or ".join(dict.fromkeys(words))


def _flow(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_flow, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def _value(value: Any) -> str:
    """A default as YAML's flow style writes it (null, true, [1, 2]), for a table cell."""
    return _flow(value).replace("|", "\\|")


def _cell(text: str) -> str:
    return f"`{text}`" if text else ""


def _unset(target: str, key: str) -> str:
    """A key the YAML leaves out: the target's own default, or that the code passes it
    (``model.num_classes`` from the dataset, an optax rate from the schedule)."""
    import inspect

    from hydra.utils import get_object

    default = inspect.signature(get_object(target)).parameters[key].default
    plain = (bool, int, float, str, list, tuple, type(None))
    if default is inspect.Parameter.empty or not isinstance(default, plain):
        return "(not in the YAML: the code passes it)"
    return f"(not in the YAML: the target's default, `{_value(default)}`)"


def rows(node: DictConfig, path: str, notes: dict[str, str], groups_at: dict[str, str]):
    """(key, type, default, range, note) for every key of ``node`` and of the ``_target_``
    nodes inside it; a node that is a group's choice is named, not expanded."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    hints: dict[str, Any] = {}
    if target:
        from hydra.utils import get_object

        hints = _accepted(get_object(target))[0]
    plain = OmegaConf.to_container(node, resolve=False)
    for key in list(plain) + [k for k in hints if k not in plain]:
        if key in _HYDRA_KEYS:
            continue
        full = f"{path}.{key}"
        note = notes.get(full.split(".", 1)[1] if "." in full else full, "")
        if full in groups_at:
            group, choice = groups_at[full].split("=")
            link = f"[`{choice}`](#{_anchor(group, choice)})"
            yield full, "a choice", f"group `{group}`, default {link}", "", note
            continue
        value = plain.get(key)
        if isinstance(value, dict) and "_target_" in value:
            yield full, f"`_target_: {value['_target_']}`", "", "", note
            yield from rows(node[key], full, notes, groups_at)
            continue
        hint, interval = _range(hints.get(key, Any))
        default = _value(value) if key in plain else _unset(target, key)
        yield full, type_text(hint) if hints else "", default, interval, note
        if isinstance(value, dict):  # a plain mapping: its keys are set one by one too
            for sub, item in value.items():
                yield (
                    f"{full}.{sub}",
                    "",
                    _value(item),
                    "",
                    notes.get(f"{full}.{sub}"[len(path) + 1 :], ""),
                )


def _choice_section(group: str, choice: str, all_groups: dict[str, list[str]]) -> list[str]:
    cfg = composed(group, choice)
    where = package(group, choice)
    node = OmegaConf.select(cfg, where)
    chosen = cfg.hydra.runtime.choices
    groups_at = {
        package(g, chosen[g]): f"{g}={chosen[g]}"
        for g in all_groups
        if chosen.get(g) and g != group
    }
    path = _yaml_file(group, choice)
    out = [f"### `{group}={choice}`", "", f"`conf/{group}/{choice}.yaml`", ""]
    if header(path):
        out += ["```text", header(path), "```", ""]
    if not isinstance(node, DictConfig):
        return out + [f"Sets `{where}` = `{_value(node)}`.", ""]
    if "_target_" in node:
        out += [f"Target: `{node._target_}`", ""]
    if not [k for k in node if k not in _HYDRA_KEYS] and not _accepted_names(node):
        return out + ["No keys.", ""]
    out += ["| key | type | default | range | note |", "|---|---|---|---|---|"]
    for key, kind, default, interval, note in rows(
        node, where, choice_notes(group, choice), groups_at
    ):
        kind = kind.replace("|", "\\|")  # types in words; a _target_ node in code
        default = default if default.startswith(("group", "(")) else _cell(default)
        note = note.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        out.append(f"| `{key}` | {kind} | {default} | {_cell(interval)} | {note} |")
    return out + [""]


def _accepted_names(node: DictConfig) -> list[str]:
    from hydra.utils import get_object

    return list(_accepted(get_object(node._target_))[0]) if "_target_" in node else []


def _root_section() -> list[str]:
    out = [
        "## Top-level keys (`conf/config.yaml`)",
        "",
        "| key | type | default | range |",
        "|---|---|---|---|",
    ]
    for f in dataclasses.fields(Root):
        hint = typing.get_type_hints(Root, include_extras=True)[f.name]
        if dataclasses.is_dataclass(hint):
            inner = typing.get_type_hints(hint, include_extras=True)
            for sub in dataclasses.fields(hint):
                _, interval = _range(inner[sub.name])
                out.append(
                    f"| `{f.name}.{sub.name}` | {type_text(inner[sub.name])} "
                    f"| {_cell(_value(sub.default))} | {_cell(interval)} |"
                )
        elif f.default is not None:
            out.append(f"| `{f.name}` | {type_text(hint)} | {_cell(_value(f.default))} | |")
    return out + [""]


HYDRA_GROUPS = ("hydra/launcher", "hydra/sweeper")


def _hydra_section() -> list[str]:
    """Hydra's launchers and sweepers: every choice (the plugins' and ours), and the keys
    of our own YAMLs with their values (their targets are the plugins' config classes)."""
    from hydra.core.object_type import ObjectType

    out = [
        "## Hydra: `hydra/launcher`, `hydra/sweeper`",
        "",
        "Where the jobs of a multirun (`-m`) run, and how a sweep picks them. `basic` is "
        "Hydra's default; the others come from hydra-submitit-launcher and "
        "hydra-optuna-sweeper. Override a key as `hydra.launcher.KEY=VALUE` or "
        "`hydra.sweeper.KEY=VALUE`.",
        "",
    ]
    for group in HYDRA_GROUPS:
        options = sorted(_loader().get_group_options(group, ObjectType.CONFIG))
        out += [f"### `{group}`", "", "Choices: " + ", ".join(f"`{o}`" for o in options), ""]
        for path in sorted((Path(CONF) / group).glob("*.yaml")):
            node = OmegaConf.load(path)
            out += [f"#### `{group}={path.stem}`", "", f"`conf/{group}/{path.name}`", ""]
            out += ["```text", header(path), "```", "", "| key | value | note |", "|---|---|---|"]
            notes = yaml_notes(path)
            plain = OmegaConf.to_container(node, resolve=False)
            for key, value in plain.items():
                if key != "defaults":
                    note = notes.get(key, "").replace("|", "\\|")
                    out.append(
                        f"| `{group.replace('/', '.')}.{key}` | `{_value(value)}` | {note} |"
                    )
            out.append("")
    return out


def _experiment_section() -> list[str]:
    root = Path(CONF) / "experiment"
    out = [
        "## `experiment`",
        "",
        "Presets: a tutorial's or paper's setup. `conf/experiment/<preset>/<method>.yaml` "
        "applies only when that method runs; `<preset>/<group>/<choice>.yaml` only to that "
        "choice.",
        "",
    ]
    for path in sorted(root.glob("*.yaml")):
        files = sorted(p.relative_to(root).as_posix() for p in (root / path.stem).rglob("*.yaml"))
        out += [f"### `experiment={path.stem}`", "", f"`conf/experiment/{path.name}`", ""]
        out += ["```text", header(path), "```", ""]
        out += ["Its per-method and per-choice files: " + ", ".join(f"`{f}`" for f in files), ""]
    return out


def markdown() -> str:
    """The whole reference page.

    Initialises Hydra on ``conf/`` for the generation only (unless the caller already
    has), so a test or a build that calls it leaves no global Hydra state behind.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return _markdown()
    try:
        with initialize_config_dir(config_dir=CONF, version_base=None):
            return _markdown()
    finally:
        _compose.cache_clear()  # the compositions belong to that initialisation
        _parents.cache_clear()


def _markdown() -> str:
    all_groups = groups()
    out = [
        "---",
        "hide: [navigation]  # the tables need the width; the contents list stays",
        "---",
        "",
        "# Config reference",
        "",
        "Generated from `conf/` and the `_target_` signatures when the site is built "
        "(`bnn_bench/reference.py`): every group, choice and key, its type and range (from "
        "the target's annotation), its default (the composed YAML) and the YAML's note. "
        "Choose with `group=choice`; set a key with `key=value`.",
        "",
        "| group | choices |",
        "|---|---|",
    ]
    for group, options in all_groups.items():
        links = ", ".join(f"[`{o}`](#{_anchor(group, o)})" for o in options)
        out.append(f"| `{group}` | {links} |")
    out += ["| `experiment` | see [experiment](#experiment) |"]
    out += [
        "| `hydra/launcher`, `hydra/sweeper` | see [Hydra](#hydra-hydralauncher-hydrasweeper) |",
        "",
    ]
    out += _root_section()
    for group, options in all_groups.items():
        out += [f"## `{group}`", ""]
        for option in options:
            out += _choice_section(group, option, all_groups)
    out += _experiment_section()
    out += _hydra_section()
    return "\n".join(out) + "\n"


def _anchor(group: str, choice: str) -> str:
    return re.sub(r"[^a-z0-9_\-]", "", f"{group}={choice}".lower().replace("/", ""))


if __name__ == "__main__":
    print(markdown())
