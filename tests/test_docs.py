"""The docs site: the generated config reference names every group, choice and key of
``conf/`` and every argument of each choice's ``_target_``, checked against the YAML files
themselves (read here with OmegaConf, not through the generator's composition)."""

from __future__ import annotations

import inspect
import re

import pytest
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from bnn_bench.reference import markdown
from tests.conftest import CONF, ROOT

pytestmark = pytest.mark.contract

HYDRA_KEYS = {"defaults", "_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# folders of YAMLs that are not choices with keys of their own: the presets (checked apart),
# launchers and sweepers, and the SG-MCMC base that sgld/psgld/sghmc compose
NOT_GROUPS = ("experiment", "hydra", "method/sampling")


def choices() -> list[tuple[str, str]]:
    """(group, choice) for every YAML under conf/ that is a choice of a group."""
    found = []
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group != "." and not group.startswith(NOT_GROUPS):
            found.append((group, path.stem))
    return found


def load(group: str, choice: str) -> DictConfig:
    """A choice's YAML over the YAMLs it composes into itself (``- base@_here_``)."""
    path = CONF / group / f"{choice}.yaml"
    node = OmegaConf.load(path)
    merged = OmegaConf.create()
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and entry.endswith("@_here_"):
            name = entry.removesuffix("@_here_")
            base = name.lstrip("/") if name.startswith("/") else f"{group}/{name}"
            merged = OmegaConf.merge(merged, load(*base.rsplit("/", 1)))
    return OmegaConf.merge(merged, node)


def section(reference: str, group: str, choice: str) -> str:
    """The part of the reference under the heading of ``group=choice``."""
    heading = f"### `{group}={choice}`"
    assert heading in reference, f"{group}={choice} is missing from the config reference"
    return reference.split(heading, 1)[1].split("\n### ", 1)[0]


def _keys(node: DictConfig, prefix: str = "") -> list[str]:
    """The dotted keys of a YAML node, into nested nodes (``files.train_images``)."""
    keys = []
    for key in node:
        if key in HYDRA_KEYS:
            continue
        keys.append(prefix + str(key))
        value = node._get_node(key)
        if isinstance(value, DictConfig) and not value._is_interpolation():
            keys += _keys(value, f"{prefix}{key}.")
    return keys


def check_every_choice(reference: str) -> None:
    found = choices()
    assert len(found) >= 40 and ("method", "sgld") in found
    for group, choice in found:
        section(reference, group, choice)
    for preset in (CONF / "experiment").glob("*.yaml"):
        assert f"### `experiment={preset.stem}`" in reference


def missing_keys(reference: str, group: str, choice: str) -> list[str]:
    """The keys of ``group=choice``'s YAML and the arguments of its target that the
    reference's section of that choice does not name."""
    text = section(reference, group, choice)
    yaml = load(group, choice)
    named = set(re.findall(r"^\| `([^`]+)`", text, flags=re.M))
    tails = {k.split(".", 1)[1] if "." in k else k for k in named}
    tails |= {t.split(".", 1)[1] for t in tails if "." in t}  # method.structure.rank etc.
    wanted = _keys(yaml)
    target = yaml.get("_target_")
    if target:
        params = inspect.signature(get_object(target)).parameters.values()
        wanted += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [
        k for k in dict.fromkeys(wanted) if not any(t == k or t.endswith("." + k) for t in tails)
    ]


def check_every_key(reference: str) -> None:
    """Each key a choice's YAML sets, and each argument its target takes."""
    missing = {f"{g}={c}": m for g, c in choices() if (m := missing_keys(reference, g, c))}
    assert not missing, f"keys missing from the config reference: {missing}"


def check_a_missing_key_is_caught(reference: str) -> None:
    """The key check fails when a row is gone (here: SG-MCMC's members_per_chain)."""
    row = "| `method.members_per_chain`"
    cut = "\n".join(line for line in reference.splitlines() if not line.startswith(row))
    assert missing_keys(cut, "method", "sgld") == ["members_per_chain"]
    assert missing_keys(reference, "method", "sgld") == []


def test_the_reference_is_built_with_the_site():
    """The site's config page is the generator's output (a hook), not a file that can age."""
    hooks = (ROOT / "mkdocs.yml").read_text()
    assert "docs/hooks/reference.py" in hooks and "reference/config.md" in hooks
    assert not (ROOT / "docs" / "reference" / "config.md").exists()


def check_the_root_keys(reference: str) -> None:
    keys = [k for k in _keys(OmegaConf.load(CONF / "config.yaml")) if not k.startswith("hydra")]
    leaves = [k for k in keys if not any(o.startswith(k + ".") for o in keys)]
    assert {"seed", "resume", "checkpoint.every", "device.mem_fraction"} <= set(leaves)
    for key in leaves:
        assert f"`{key}`" in reference, key


def test_the_generated_reference_names_every_group_choice_and_key():
    """One test, so that the page is generated once (it composes every choice: ~10 s of
    CPU) whichever xdist worker runs it."""
    reference = markdown()
    check_every_choice(reference)
    check_every_key(reference)
    check_the_root_keys(reference)
    check_a_missing_key_is_caught(reference)


def test_docstring_literal_blocks_and_doctests_become_code():
    """docs/hooks/doctest_blocks.py: reST's ``::`` blocks and ``>>>`` lines as fences
    (Markdown would read ``>>>`` as three nested quotes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("d", ROOT / "docs/hooks/doctest_blocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "Update::\n\n    θ ← θ + ε g\n\nThen\n\n    >>> 1 + 1\n    2\n"
    assert module.fence(text).splitlines() == [
        "Update:",
        "",
        "```text",
        "θ ← θ + ε g",
        "```",
        "",
        "Then",
        "",
        "```python",
        ">>> 1 + 1",
        "2",
        "```",
    ]
