"""A griffe extension for the docs site: the docstrings' reStructuredText habits as
Markdown, so mkdocstrings renders them as code. A paragraph ending in ``::`` is followed
by a literal block (its indented lines), and ``>>>`` lines with their output are a doctest;
both become fenced code blocks (Markdown would read ``>>>`` as nested quotes)."""

from __future__ import annotations

import re

import griffe


def fence(text: str) -> str:
    """``text`` with its ``::`` literal blocks and ``>>>`` doctests fenced."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i].strip())
                i += 1
            out += ["```python", *block, "```"]
            continue
        if line.rstrip().endswith("::") and not line.strip().startswith("```"):
            out.append(re.sub(r"::$", ":", line.rstrip()))
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            while block and not block[0].strip():
                block.pop(0)
            while block and not block[-1].strip():
                block.pop()
            indent = min((len(b) - len(b.lstrip()) for b in block if b.strip()), default=0)
            out += ["", "```text", *[b[indent:] for b in block], "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    """Fences the literal blocks and doctests of every docstring mkdocstrings renders."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence(obj.docstring.value)
