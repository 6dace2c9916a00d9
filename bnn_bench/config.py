"""Config ⇄ code: every node with a ``_target_`` maps 1:1 onto its target's arguments.

``validate`` walks a composed config before any work starts, so a misspelt key
in a YAML or an experiment preset stops the run with a message that names the
key, its place, and the arguments the target accepts. ``build`` instantiates a
node and turns instantiation errors into the same kind of message.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from bnn_bench.errors import UserError
from bnn_bench.groups import check_composed

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def _accepted(target: Any) -> tuple[set[str], bool]:
    """The keyword names ``target`` accepts, and whether it takes **kwargs."""
    sig = inspect.signature(target)
    names = {
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def validate(cfg: Any, path: str = "") -> None:
    """Checks every ``_target_`` node of ``cfg`` (recursively) against its target.

    Raises:
      UserError: naming the first unknown target or unknown key, with the
        accepted keys and the closest match.
    """
    if not path and isinstance(cfg, DictConfig):
        check_composed(cfg)  # a trainer node reached a method that does not train
    if isinstance(cfg, ListConfig):
        for i, item in enumerate(cfg):
            validate(item, f"{path}[{i}]")
        return
    if not isinstance(cfg, DictConfig):
        return
    if "_target_" in cfg:
        name = cfg._target_
        try:
            target = get_object(name)
        except Exception as e:  # noqa: BLE001 - any import failure means the same thing here
            raise UserError(f"{path or 'config'}: cannot find _target_ {name!r} ({e}).") from e
        names, var_kw = _accepted(target)
        if not var_kw:
            for key in cfg:
                if key in _HYDRA_KEYS or key in names:
                    continue
                close = difflib.get_close_matches(str(key), sorted(names), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise UserError(
                    f"Unknown key '{path + '.' if path else ''}{key}' for {name}.{hint} "
                    f"Accepted keys: {', '.join(sorted(names))}."
                )
    for key in cfg:
        if key in _HYDRA_KEYS:
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig | ListConfig):
            validate(node, f"{path}.{key}" if path else str(key))


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
