"""The README runs as written: every ``bnn-bench`` command in it passes a dry run.

Commands are taken from code blocks and from inline code (a command may continue
over lines with a backslash); placeholders (``<run folder>``, ``...``), commands
that need a cluster or an earlier run's folder, and ``--help``/``--cfg`` are left
out, as are sweeps with another launcher or sweeper (a dry run checks a sweep with
Hydra's basic ones). A command the README says fails (``# fails``) must fail.
"""

from __future__ import annotations

import re
import shlex
import sys

import pytest

from tests.conftest import ROOT

# dry runs use Hydra's basic launcher and sweeper (bnn_bench/sweep.py says why)
SKIP = (
    "<",
    "...",
    "--help",
    "--cfg",
    "--hydra-help",
    "hydra/launcher=",
    "hydra/sweeper=",
    "init_from=outputs/",
)


def readme_commands() -> list[tuple[str, bool]]:
    """(command, expected to fail) for every runnable ``bnn-bench`` command in README.md."""
    lines = (ROOT / "README.md").read_text().replace("\\\n", " ").splitlines()
    found = []
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("`bnn-bench ") or text.startswith("`bnn-bench`"):
            text = text[1:]
            while "`" not in text and i + 1 < len(lines):  # inline code over two lines
                i += 1
                text += " " + lines[i].strip()
            text = text.split("`")[0]
        elif not re.match(r"bnn-bench( |$)", text):
            continue
        command, _, comment = text.partition(" #")
        command = " ".join(command.split())
        if not any(s in command for s in SKIP):
            found.append((command, "fails" in comment))
    return sorted(set(found))


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 15, COMMANDS
    assert ("bnn-bench", False) in COMMANDS  # the default experiment


@pytest.fixture(autouse=True)
def _restore_logging():
    """Hydra configures the root logger in-process; its handlers would outlive capsys."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:], root.level = handlers, level


@pytest.mark.slow  # ~100 s for all: real datasets' headers, model compiles for the memory plan
@pytest.mark.parametrize("command,fails", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_readme_command_passes_a_dry_run(command, fails, tmp_path, monkeypatch, capsys):
    from bnn_bench.cli import main

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))  # not the user's own data
    args = shlex.split(command)[1:]
    argv = ["bnn-bench", *args, "dry_run=true"]
    argv += [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    if fails:
        assert code != 0, out.out[-2000:]
        return
    assert code == 0, out.err[-2000:]
    jobs = out.out.count("dry run (nothing was trained or written)")
    assert jobs >= 1 and (jobs > 1) == ("-m" in args), out.out[-2000:]
