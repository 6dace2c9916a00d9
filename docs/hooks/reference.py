"""mkdocs hook: builds ``reference/config.md`` from ``conf/`` and the ``_target_``
signatures at build time (``bnn_bench/reference.py``), so the page cannot go stale."""

from __future__ import annotations

import os

from mkdocs.structure.files import File


def on_files(files, config):
    """Adds the generated config reference to the site's files."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from bnn_bench.reference import markdown

    files.append(File.generated(config, "reference/config.md", content=markdown()))
    return files
