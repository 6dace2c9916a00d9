"""Config ⇄ code: every node with a ``_target_`` maps 1:1 onto its target's arguments.

``validate`` walks a composed config before any work starts, so a misspelt key
in a YAML or an experiment preset stops the run with a message that names the
key, its place, and the arguments the target accepts; and a value of the wrong
type (``trainer.epochs=abc``) stops it with the key and the type the target's
annotation asks for. ``build`` instantiates a node and turns instantiation
errors into the same kind of message.
"""

from __future__ import annotations

import collections.abc as cabc
import copy
import dataclasses
import difflib
import inspect
import os
import sys
import types
import typing
from typing import Annotated, Any, Literal

import numpy as np
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, ValueNode, open_dict
from omegaconf.errors import OmegaConfBaseException

from bnn_bench.errors import UserError
from bnn_bench.schema import Root, out_of_range

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}

# Keys renamed to the glossary's names (docs/glossary.md, issue 22), refused for one release
# with a message naming the new key: {old name: the new names it may have become}. The
# first new name the target accepts is the one (``size`` is ``members`` for
# method=ensemble, ``fits`` for method=multi). Remove after the next release.
RENAMED: dict[str, tuple[str, ...]] = {
    "size": ("members", "fits"),
    "n_voters": ("members",),
    "num_estimators": ("members",),
    "num_samples": ("members", "members_per_chain"),
    "accepted_samples": ("members_per_chain",),
    "iterations": ("steps",),
    "num_warmup": ("burn_in",),
    "chunk_size": ("members_per_chunk",),
}


def renamed(path: str, names: cabc.Iterable[str], value: Any = None) -> str | None:
    """The message for the dotted key ``path`` if its last part is an old name
    (``RENAMED``) whose new name is among ``names`` (the keys its node takes); None
    otherwise. ``value``: the value it was given, repeated under the new name."""
    head, _, old = path.rpartition(".")
    new = next((n for n in RENAMED.get(old, ()) if n in set(names)), None)
    if new is None:
        return None
    full = f"{head}.{new}" if head else new
    use = f"{full}={value}" if value is not None else f"{full} instead"
    return f"{path} was renamed to {full} (docs/glossary.md); use {use}."


def _accepted(target: Any) -> tuple[dict[str, Any], bool]:
    """The keyword arguments ``target`` accepts with their annotations (``Any`` where
    there is none or it cannot be resolved), and whether it takes **kwargs."""
    sig = inspect.signature(target)
    module = sys.modules.get(getattr(target, "__module__", ""), None)
    scope = vars(module) if module is not None else {}
    names = {}
    for p in sig.parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        hint = p.annotation
        if hint is p.empty:
            hint = Any
        elif isinstance(hint, str):  # `from __future__ import annotations`
            try:
                hint = eval(hint, dict(scope))  # noqa: S307 - the target's own annotation
            except Exception:  # noqa: BLE001 - e.g. a name imported only for type checkers
                hint = Any
        names[p.name] = hint
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


# --- type checks -----------------------------------------------------------------------------

_NUMERIC = (float, complex, np.ndarray, np.number, np.bool_)
_ARRAY_NAMES = {"Array", "ArrayImpl", "ndarray"}
_SEQUENCES = (
    list,
    tuple,
    cabc.Sequence,
    cabc.Iterable,
    cabc.Collection,
    cabc.MutableSequence,
    set,
    frozenset,
)


def _atoms(hint: Any) -> list[Any]:
    """The alternatives of a Union/Optional annotation (one for anything else)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for h in typing.get_args(hint) for a in _atoms(h)]
    return [hint]


def _describe(hint: Any, alone: bool = True) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint in _NUMERIC or getattr(hint, "__name__", "") in _ARRAY_NAMES:
        return "a number"
    if hint is str or hint in (os.PathLike,) or getattr(hint, "__name__", "") == "Path":
        return "a string"
    if origin is Literal:
        return ("one of " if alone else "") + ", ".join(repr(a) for a in args)
    if hint in _SEQUENCES or origin in _SEQUENCES:
        return "a list"
    if hint in (dict, cabc.Mapping) or origin in (dict, cabc.Mapping):
        return "a mapping"
    if hint is cabc.Callable or origin is cabc.Callable:
        return "a _target_ node"
    return f"a {getattr(hint, '__name__', hint)} (a _target_ node)"


def _fits(value: Any, hint: Any, path: str) -> str | None:
    """None if ``value`` fits ``hint``; else why not (naming the key at ``path``).

    Annotations the checker cannot judge (Any, type variables, unresolvable names)
    accept every value."""
    atoms = _atoms(hint)
    reasons = []
    for atom in atoms:
        why = _fits_atom(value, atom, path)
        if why is None:
            return None
        reasons.append(why)
    if len(atoms) == 1:
        return reasons[0]
    # keep the element-level reason of a list that is close (e.g. Sequence[int] with a str)
    deep = [r for r in reasons if not r.startswith(f"{path}:")]
    if deep:
        return deep[0]
    wanted = " or ".join(dict.fromkeys(_describe(a, alone=False) for a in atoms))
    return f"{path}: expected {wanted}, got {_show(value)}"


def _show(value: Any) -> str:
    if isinstance(value, DictConfig | ListConfig):
        return repr(OmegaConf.to_container(value, resolve=False))
    return repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar_test(hint: Any) -> Any:
    """The test a value must pass for a scalar annotation, or None if ``hint`` is not
    one. Arrays accept a list too (but a plain float does not)."""
    name = getattr(hint, "__name__", "")
    if hint is Any or isinstance(hint, typing.TypeVar | typing.ForwardRef | str):
        return lambda v: True
    if hint is type(None):
        return lambda v: v is None
    if hint is bool or hint is np.bool_:
        return lambda v: isinstance(v, bool)
    if hint is int:
        return _is_int
    if hint in _NUMERIC or name in _ARRAY_NAMES:
        return lambda v: _is_number(v) or (isinstance(v, ListConfig) and hint is not float)
    if hint is str or hint is os.PathLike or name in ("Path", "PurePath"):
        return lambda v: isinstance(v, str)
    if typing.get_origin(hint) is Literal:
        return lambda v: v in typing.get_args(hint)
    return None


def _fits_sequence(value: Any, hint: Any, path: str, bad: str) -> str | None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not isinstance(value, ListConfig | list | tuple):
        return bad
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            return f"{path}: expected a list of {len(args)} values, got {_show(value)}"
        items = list(zip(args, value, strict=True))
    else:
        items = [(args[0] if args else Any, v) for v in value]
    return next((w for i, (h, v) in enumerate(items) if (w := _fits(v, h, f"{path}[{i}]"))), None)


def _fits_mapping(value: Any, hint: Any, path: str, bad: str) -> str | None:
    if not isinstance(value, DictConfig | dict):
        return bad
    args = typing.get_args(hint)
    if len(args) != 2:
        return None
    return next((w for k in value if (w := _fits(value[k], args[1], f"{path}.{k}"))), None)


_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def _fits_atom(value: Any, hint: Any, path: str) -> str | None:
    """None if ``value`` fits the single (non-Union) annotation ``hint``; else why not."""
    origin = typing.get_origin(hint)
    if origin is Annotated:  # a type and its range (bnn_bench.schema.Interval)
        base, *marks = typing.get_args(hint)
        return _fits(value, base, path) or out_of_range(value, tuple(marks), path)
    bad = f"{path}: expected {_describe(hint)}, got {_show(value)}"
    test = _scalar_test(hint)
    if test is not None:
        return None if test(value) else bad
    if hint in _SEQUENCES or origin in _SEQUENCES:
        return _fits_sequence(value, hint, path, bad)
    if hint in _MAPPINGS or origin in _MAPPINGS:
        return _fits_mapping(value, hint, path, bad)
    if hint is cabc.Callable or origin is cabc.Callable or inspect.isclass(hint):
        # a callable or an object: a node that instantiation turns into one
        if isinstance(value, DictConfig | ListConfig):
            return None
        if inspect.isclass(hint) and not isinstance(value, str | int | float | bool | type(None)):
            return None
        return bad
    return None  # an annotation this checker does not know: accept


def _check_value(cfg: DictConfig, key: Any, hint: Any, path: str) -> None:
    if OmegaConf.is_missing(cfg, key):
        return
    try:
        value = cfg[key]
    except OmegaConfBaseException as e:
        raise UserError(f"{path}: {e}".splitlines()[0]) from None
    why = _fits(value, hint, path)
    if why is not None:
        raise UserError(why + ".")


def _passed_on(cfg: DictConfig, key: str) -> bool:
    """Whether an interpolation outside the top-level node ``key`` names it
    (``method.trainer: ${trainer}``): the only way a node beyond ``Root``'s is read."""

    def strings(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    others = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in (key, "hydra")])
    texts = strings(OmegaConf.to_container(others, resolve=False))
    return any(f"${{{key}}}" in t or f"${{{key}." in t for t in texts)


def reads_trainer(cfg: DictConfig) -> bool:
    """Whether the method trains a network: some node passes ``trainer`` on
    (``method.trainer: ${trainer}``)."""
    return "trainer" in cfg and _passed_on(cfg, "trainer")


def without_unread_trainer(cfg: DictConfig) -> DictConfig:
    """``cfg`` without its ``trainer`` node when no part of it reads the node (a method
    that does not train). ``conf/config.yaml`` composes the trainer group for every method
    so that a preset can choose its optimizer and schedule (``override
    /trainer/optimizer: sgd``) whatever method a sweep runs; a command that sets
    ``trainer.*`` for such a method is refused before this (``overrides.refuse_trainer``)."""
    if "trainer" not in cfg or reads_trainer(cfg):
        return cfg
    cfg = copy.deepcopy(cfg)  # keeps the struct flag
    with open_dict(cfg):
        del cfg["trainer"]
    return cfg


def _check_schema(cfg: DictConfig, key: Any, hint: Any, path: str) -> None:
    """Checks ``cfg[key]`` against ``hint``; a dataclass (a node of ``Root``) key by key."""
    node = cfg._get_node(key)
    if dataclasses.is_dataclass(hint) and isinstance(node, DictConfig):
        check_fields(node, hint, path)
    else:
        _check_value(cfg, key, hint, path)


def check_fields(node: DictConfig, schema: type, path: str) -> None:
    """Checks the keys of ``node`` (at ``path``) against the fields of the dataclass
    ``schema``: no unknown key, each value of its field's type and range.

    Raises:
      UserError: naming the first key that is unknown or whose value does not fit.
    """
    names, _ = _accepted(schema)
    for k in node:
        if k not in names:
            _unknown(f"{path}.{k}", schema.__name__, names)
        _check_schema(node, k, names[k], f"{path}.{k}")


def _validate_root(cfg: DictConfig) -> None:
    """The root's own keys against ``schema.Root``; a node beyond them must be passed on
    by an interpolation, else the run would ignore it, except ``trainer``, which every
    config composes and a run drops when unread (``without_unread_trainer``)."""
    names, _ = _accepted(Root)
    for key in cfg:
        if key == "hydra":
            continue
        if key in names:
            _check_schema(cfg, key, names[key], str(key))
        elif key == "trainer" and not _passed_on(cfg, key):
            continue  # composed for every method; a run drops it (without_unread_trainer)
        elif not _passed_on(cfg, key):
            method = OmegaConf.select(cfg, "method._target_", default="the method")
            raise UserError(
                f"{key}: no part of this config reads it (no ${{{key}}} interpolation passes "
                f"it on; {method} takes no {key}), so the run would ignore the {key} keys; "
                f"remove them."
            )


def validate(cfg: Any, path: str = "") -> None:
    """Checks ``cfg`` before any work: the root's own keys (``schema.Root``), then every
    ``_target_`` node (recursively) against its target's signature.

    A node that is an interpolation of another (``trainer: ${trainer}``) is
    checked where it is defined, so an error names the key a user can override.

    Raises:
      UserError: naming the first unknown target, unknown key, or value whose type
        the target's annotation does not accept.
    """
    if not path and isinstance(cfg, DictConfig):
        _validate_root(cfg)
    if isinstance(cfg, ListConfig):
        for i in range(len(cfg)):
            node = cfg._get_node(i)
            if isinstance(node, DictConfig | ListConfig) and not node._is_interpolation():
                validate(node, f"{path}[{i}]")
        return
    if not isinstance(cfg, DictConfig):
        return
    if "_target_" in cfg:
        _validate_target(cfg, path)
    for key in cfg:
        if key in _HYDRA_KEYS:
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig | ListConfig) and not node._is_interpolation():
            validate(node, f"{path}.{key}" if path else str(key))


def _validate_target(cfg: DictConfig, path: str) -> None:
    name = cfg._target_
    try:
        target = get_object(name)
    except Exception as e:  # noqa: BLE001 - any import failure means the same thing here
        raise UserError(f"{path or 'config'}: cannot find _target_ {name!r} ({e}).") from e
    names, var_kw = _accepted(target)
    prefix = f"{path}." if path else ""
    for key in cfg:
        if key in _HYDRA_KEYS:
            continue
        if key not in names:
            if var_kw:
                continue
            _unknown(f"{prefix}{key}", name, names, cfg._get_node(key))
        node = cfg._get_node(key)
        if not (isinstance(node, DictConfig | ListConfig) and node._is_interpolation()):
            _check_value(cfg, key, names[key], f"{prefix}{key}")


def _unknown(path: str, name: str, names: dict[str, Any], node: Any = None) -> None:
    """Refuses the key at ``path`` (its config ``node``), which ``name`` does not take
    (``names``): by its new name if it was renamed (``RENAMED``), else by a close one."""
    scalar = isinstance(node, ValueNode) and not node._is_interpolation()
    message = renamed(path, names, node._value() if scalar else None)
    if message is not None:
        raise UserError(message)
    close = difflib.get_close_matches(path.rsplit(".", 1)[-1], sorted(names), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(
        f"Unknown key '{path}' for {name}.{hint} Accepted keys: {', '.join(sorted(names))}."
    )


def build(cfg: DictConfig, path: str, **runtime: Any) -> Any:
    """Instantiates ``cfg`` (a node at ``path``) with extra runtime arguments.

    Errors from the target's constructor that come from bad values (TypeError,
    ValueError) are reported as a UserError naming the config node.
    """
    try:
        return instantiate(cfg, **runtime)
    except UserError:
        raise
    except Exception as e:  # hydra wraps constructor errors in InstantiationException
        cause = e.__cause__ or e
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, TypeError | ValueError):
            raise UserError(f"{path}: {cause}") from e
        raise


def to_dict(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (for loggers and metrics.json)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
