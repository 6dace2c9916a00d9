"""The README and the docs run as written: every ``bnn-bench`` command in README.md and in
every page under ``docs/`` passes a dry run.

Commands are taken from code blocks and from inline code (a command may continue
over lines with a backslash); placeholders (``<run folder>``, ``...``), commands
that need a cluster or an earlier run's folder (``init_from=``: each such folder must
be one another README command writes), and ``--help``/``--cfg`` are left out, as are
sweeps with another launcher or sweeper (a dry run checks a sweep with Hydra's basic
ones). A command the README says fails (``# fails``) must fail. The README's test command
is the one CI runs (``.ci/run``).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_env, documentation_files

pytestmark = pytest.mark.contract

# dry runs use Hydra's basic launcher and sweeper (bnn_bench/sweep.py says why)
SKIP = (
    "<",
    "...",
    "--help",
    "--cfg",
    "--hydra-help",
    "hydra/launcher=",
    "hydra/sweeper=",
    "init_from=",  # an earlier run's folder: test_readme_init_from_folders_are_written_here
)


def readme_commands(skip: tuple[str, ...] = SKIP) -> list[tuple[str, bool]]:
    """(command, expected to fail) for every ``bnn-bench`` command in README.md and the
    docs pages that contains none of ``skip``."""
    found = []
    for path in documentation_files():
        found += _commands(path.read_text(), skip)
    return sorted(set(found))


def _commands(text: str, skip: tuple[str, ...]) -> list[tuple[str, bool]]:
    lines = text.replace("\\\n", " ").splitlines()
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
        if not any(s in command for s in skip):
            found.append((command, "fails" in comment))
    return found


COMMANDS = readme_commands()


def _jobs(command: str) -> int:
    """The jobs a command runs: 1, or for ``-m`` the product of its sweeps' lengths
    (Hydra's own override parser)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = shlex.split(command)[1:]
    if args[:1] != ["-m"]:
        return 1
    jobs = 1
    for override in OverridesParser.create().parse_overrides(args[1:]):
        if override.is_sweep_override():
            jobs *= len(list(override.sweep_iterator()))
    return jobs


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 15, COMMANDS
    assert ("bnn-bench", False) in COMMANDS  # the default experiment


def test_the_docs_pages_are_read_too():
    """The command check reads every page of the site, not the README alone."""
    pages = {p.relative_to(ROOT).as_posix() for p in documentation_files()}
    assert {"README.md", "docs/operations.md", "docs/getting-started.md"} <= pages
    in_docs = {c for p in documentation_files()[1:] for c, _ in _commands(p.read_text(), SKIP)}
    assert len(in_docs) >= 15, in_docs


def test_the_readme_test_command_is_the_one_ci_runs():
    """The README's test command (its line ending in ``# the tests, ...``) is .ci/run's."""
    readme = (ROOT / "README.md").read_text()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    said = [line.split("#")[0].strip() for line in readme.splitlines() if "# the tests" in line]
    assert len(said) == 1 and said[0] in ci, (said, "not a line of .ci/run")


def test_readme_commands_stand_alone():
    """Each command runs as written, copied alone: no shell variable set elsewhere."""
    assert not [c for c, _ in COMMANDS if re.search(r"\$\w", c)]


def test_readme_init_from_folders_are_written_here():
    """A command that starts from an earlier run names a folder that a README command
    writes (``hydra.run.dir``), so the README's commands run in order on a fresh
    machine, with nothing from the machine they were measured on."""
    commands = [c for c, _ in readme_commands(skip=())]
    written = {m for c in commands for m in re.findall(r"hydra\.run\.dir=(\S+)", c)}
    wanted = {
        m
        for c in commands
        for m in re.findall(r"init_from=(?:choice\()?([^\s)\"'<]+)", c)
        if m != "..."
    }
    assert wanted, "the README has no init_from command to check"
    assert wanted <= written, sorted(wanted - written)


@pytest.mark.e2e  # ~1-2 min: real datasets' headers, model compiles for the memory plan
def test_every_readme_command_passes_a_dry_run(tmp_path):
    env = cli_env()
    env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")  # not the user's own data
    proc = subprocess.run(
        [sys.executable, "-m", "tests.readme_dry_run"],
        input=json.dumps([c for c, _ in COMMANDS]),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=1800,
    )
    rows = {r["command"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert len(rows) == len(COMMANDS), proc.stderr[-3000:]
    wrong = []
    for command, fails in COMMANDS:
        r = rows[command]
        ok = r["code"] != 0 if fails else r["code"] == 0 and r["plans"] == _jobs(command)
        if not ok:
            wrong.append(f"{command}\n  -> exit {r['code']}, {r['plans']} plan(s): {r['err']}")
    assert not wrong, "\n".join(wrong)
