"""Every key an error or warning message names works as an override.

The messages are read from the source: every string in a ``UserError(...)``, a
``.warning(...)`` or a ``Divergence(...)`` call under ``bnn_bench/``. Each config key
in them (``method.x.y``, ``trainer.z=v``, a group choice
``method/laplace/structure=diagonal``) must compose, validate and build for at least
one method.
"""

from __future__ import annotations

import ast
import functools
import re

import jax
import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from bnn_bench.config import build, validate
from bnn_bench.errors import UserError
from bnn_bench.run import run
from tests.conftest import CONF, ROOT, TINY, compose_cfg, config_choices

pytestmark = pytest.mark.contract

GROUPS = "method|trainer|dataset|model|likelihood|eval|logger|checkpoint|device"
# a dotted key (method.structure.rank) or a group choice (method/laplace/structure), then
# an optional =value
KEY = re.compile(
    rf"(?<![\w./@])((?:{GROUPS})(?:(?:\.[a-z_][a-z_0-9]*)+|(?:/[a-z_][a-z_0-9]*)+"
    rf"|@[a-z_][a-z_0-9.]*))"
    rf"(=[^\s,;'\"{{}}()]*)?"
)
# a value in capitals, <...> or a %-format (a logging call's argument) is a placeholder
PLACEHOLDER = re.compile(r"^([A-Z_]+|<.*>|%[-+ #0-9.]*[dgfsr]\S*)$")


def _message_strings(tree: ast.AST):
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if name not in ("UserError", "warning", "Divergence"):  # a Divergence's fix is a message
            continue
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            for sub in ast.walk(arg):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub.value


def suggested() -> list[tuple[str, str | None]]:
    """(key, value or None) of every config key that a message names (None: a key
    named without a value)."""
    found = set()
    for path in sorted((ROOT / "bnn_bench").rglob("*.py")):
        for text in _message_strings(ast.parse(path.read_text())):
            for key, value in KEY.findall(text):
                value = value[1:].rstrip(".") if value else ""
                if PLACEHOLDER.match(value) or value.count("[") != value.count("]"):
                    value = ""  # the value is a placeholder or comes from an f-string
                found.add((key, value or None))
    return sorted(found, key=lambda kv: (kv[0], kv[1] or ""))


# configs that hold keys no group choice does (the OOD set's dataset node)
# and the keys of a step-size schedule that only a cyclical one has (its messages come
# from a run with that schedule)
EXTRA = [
    ("dataset@eval.ood_dataset=mnist",),
    (
        "method.step_size._target_=bnn_bench.methods.sampling.schedules.cyclical",
        "+method.step_size.num_cycles=4",
        "+method.step_size.exploration_fraction=0.9",
    ),
]


def _contexts(key: str) -> list[tuple[str, ...]]:
    """The configs to try ``key`` in: the default, each choice of its own group, every
    preset, method, model, dataset and logger choice."""
    top = key.replace("/", ".").replace("@", ".").split(".")[0]
    groups = ["experiment", "method", "model", "likelihood", "dataset", "logger"]
    if top in groups:
        groups.remove(top)
        groups.insert(0, top)
    return [(), *[(f"{g}={c}",) for g in groups for c in config_choices(g)], *EXTRA]


@functools.cache
def _composed(base: tuple[str, ...]):
    return compose_cfg(*base)


def _works(key: str, value: str | None, base: tuple[str, ...]) -> bool:
    """Whether ``key`` is in the config composed from ``base`` (value None) or
    ``key=value`` composes and validates on top of it; method, trainer and model nodes
    are also built."""
    if value is None and ("/" in key or "@" in key):
        return (CONF / key.split("@")[0]).is_dir()  # a group named without a choice
    if value is None:
        return OmegaConf.select(_composed(base), key, default="<absent>") != "<absent>"
    top = key.replace("/", ".").replace("@", ".").split(".")[0]
    try:
        cfg = compose_cfg(*base, f"{key}={value}")
        validate(cfg)
        if top in ("method", "trainer"):
            build(cfg[top], top)
        elif top == "model":
            build(cfg.model, "model", num_classes=10)
        return True
    except (HydraException, UserError):
        return False


def test_messages_name_config_keys():
    """The scan finds the messages it is meant to check (so the next test checks them)."""
    keys = {k for k, _ in suggested()}
    assert {"method.step_size", "trainer.batch_size", "dataset.val_fraction"} <= keys


@pytest.mark.parametrize("key,value", suggested())
def test_every_suggested_override_works(key, value):
    contexts = _contexts(key)
    assert any(_works(key, value, base) for base in contexts), f"{key}={value} works nowhere"


@pytest.mark.e2e
def test_a_number_for_the_step_size_is_a_constant_schedule(tmp_path):
    """The divergence message says "Lower method.step_size": a number there runs."""
    overrides = [o for o in TINY if not o.startswith(("method", "trainer"))]
    cfg = compose_cfg(
        *overrides,
        "method=sgld",
        "method.step_size=3e-7",
        "method.steps=6",
        "method.epochs=null",
        "method.burn_in=2",
        "method.burn_in_epochs=null",
        "method.members_per_chain=2",
        "method.batch_size=64",
    )
    method = build(cfg.method, "method")
    assert float(method.step_size(jax.numpy.arange(3), 6)[2]) == pytest.approx(3e-7)
    metrics = run(cfg, tmp_path)
    assert metrics["test/acc"] > 0
