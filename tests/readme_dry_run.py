"""Runs ``bnn-bench <args> dry_run=true`` for each command given as JSON on stdin, in this
one process (a dry run compiles each model once per process), and prints one JSON line
per command: its exit code, the number of plans printed and the last lines of stderr.
Used by tests/test_readme.py in a subprocess, away from pytest's output capture."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys
import tempfile


def main() -> None:
    from bnn_bench.cli import main as bnn_bench
    from bnn_bench.data import sources

    # The README is checked offline too: a download's hosts count as reachable here
    # (tests/data/test_tfds_download.py covers the probe).
    sources.probe_download = lambda *args: None

    for command in json.load(sys.stdin):
        with tempfile.TemporaryDirectory() as tmp:
            sys.argv = ["bnn-bench", *shlex.split(command)[1:], "dry_run=true"]
            sys.argv += [f"hydra.run.dir={tmp}/run", f"hydra.sweep.dir={tmp}/sweep"]
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    bnn_bench()
                    code = 0
                except SystemExit as e:
                    code = e.code
        plans = out.getvalue().count("dry run (nothing was trained or written)")
        row = {"command": command, "code": code, "plans": plans, "err": err.getvalue()[-1500:]}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
