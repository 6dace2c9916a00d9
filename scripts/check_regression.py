"""Regression check: rerun named cases of the CLI and compare metrics.json bit for bit.

Each case is a list of ``bnn-bench`` overrides: the default experiment, ``method=map``,
every experiment preset (on Fashion-MNIST, the offline dataset, with a smaller budget)
and every method on the default MLP. For each case the script runs
``python -m bnn_bench.cli <overrides> hydra.run.dir=<tmp>`` with this checkout first on
PYTHONPATH and compares the run's metrics.json with ``scripts/regression/<case>.json``,
recorded by ``--record`` from a reference version of the code.

Compared: every flat number of metrics.json, and every curve (flattened to
``curves/<split>/<curve>/<column>``), exactly (JSON floats round-trip, so equal means
bit-for-bit). Ignored, because they measure the machine and not the result:
  time/*               wall-clock seconds of the run's phases (and the sampler's compile)
  */time_*             wall-clock seconds a method measured itself (laplace/time_prior, ...)
  cost/compile_s       wall-clock seconds spent compiling
  cost/peak_device_mib peak device memory (allocator-dependent; only reported on GPUs)
  *_per_s              throughput (sampler/burn_in_steps_per_s, ...)
Bit-for-bit equality holds for the same code on the same machine (same CPU, core count
and library versions; the stored ``environment`` says which); elsewhere expect
last-digit differences, and record a new reference there first.

A stored key missing from the new run and a new key with the same value are reported
as a probable rename; a rename the code made on purpose is declared in ``RENAMES``
(or with ``--rename old=new``) and then compared under the new name. Overrides that
differ from the ones stored with the case are printed, so a case adapted to renamed
config keys stays visible. Keys added on purpose (say ``map/*``) can be left out with
``--ignore``. Exit status: 0 when every case matches, 1 on any difference, 2 when a
run failed.

Recorded on commit 219fb04 (issue 22; the stored files name their commit), after
two checks on this machine: the 14 cases recorded on the code before issue 22's refactor
(153b4de) were equal, bit for bit, on the refactored code before the renames (the methods in
their packages, run_folder.py, typed datasets; main at 381a518) and again on the final
code with the renamed keys (every number the same; the metric renames in RENAMES are time
keys or absent from these cases). The cases swag, temperature, mc_dropout, vi, multi and hmc
were added then and have no earlier recording.

  python scripts/check_regression.py                      # every case: 39 min on 2 cores at
                                                          # load 15; idle ~5-10 min (estimated)
  python scripts/check_regression.py --cases default,map  # some cases
  python scripts/check_regression.py --record             # (re)write the stored files
  python scripts/check_regression.py --list               # the cases and their overrides
  python scripts/check_regression.py --out runs --cases map  # keep the run folders in runs/
  python scripts/check_regression.py --out runs --no-run  # compare runs/<case>/ again
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STORE = Path(__file__).resolve().parent / "regression"

# Budget overrides keep each case to about 1-2 minutes on 2 CPU cores. They use
# `method.*`, `dataset.*` and `model.*` keys where the budget lives there; the trainer's
# own budget key only where a preset counts steps (laplax_mnist).
_SGMCMC_SMALL = ["method.epochs=4", "method.burn_in_epochs=2", "method.members_per_chain=20"]
CASES: dict[str, list[str]] = {
    # The default experiment as it is: SGLD, MLP, Fashion-MNIST, the full budget.
    "default": [],
    # The trainer's default recipe, the full budget (MLP).
    "map": ["method=map"],
    # Presets, on Fashion-MNIST. SG-MCMC presets: the same kernel, step and batch,
    # fewer warm-up steps and samples (still one sample per step, as in the preset).
    "blackjax_mnist_sgld": [
        "experiment=blackjax_mnist_sgld",
        "dataset=fashion_mnist",
        "method.steps=550",
        "method.burn_in=500",
        "method.members_per_chain=50",
    ],
    "blackjax_mnist_sghmc": [
        "experiment=blackjax_mnist_sghmc",
        "dataset=fashion_mnist",
        "method.steps=250",
        "method.burn_in=200",
        "method.members_per_chain=50",
    ],
    # MobileNetV1 without BN, pSGLD with the preset's kernel and polynomial schedule, on
    # 1024 Fashion-MNIST images resized to 32x32 (one channel: the preset's 1/255 std for
    # it), 10 epochs of which 8 burn in, 4 samples; test and validation halves of the
    # test split as in the preset.
    "jaxsgmc_cifar10_psgld": [
        "experiment=jaxsgmc_cifar10_psgld",
        "dataset=fashion_mnist",
        "dataset.subset=1024",
        "dataset.resize=[32,32]",
        "dataset.mean=[0.0]",
        "dataset.std=[0.00392156862745098]",
        "method.epochs=10",
        "method.burn_in_epochs=8",
        "method.members_per_chain=4",
    ],
    "laplax_mnist": [
        "experiment=laplax_mnist",
        "dataset=fashion_mnist",
        "trainer.steps=400",
    ],
    "tu_mnist_mcbn": [
        "experiment=tu_mnist_mcbn",
        "dataset=fashion_mnist",
        "dataset.subset=8192",
    ],
    "capsa_mnist_vote": [
        "experiment=capsa_mnist_vote",
        "dataset=fashion_mnist",
        "dataset.subset=4096",
    ],
    # Every other method on the default MLP and dataset (LeNet with BN for MC-BN).
    "psgld": ["method=psgld", *_SGMCMC_SMALL],
    "sghmc": ["method=sghmc", *_SGMCMC_SMALL],
    "laplace": ["method=laplace", "dataset.subset=8192"],
    "mcbn": ["method=mcbn", "model=lenet", "model.norm=batchnorm", "dataset.subset=4096"],
    "vote": ["method=vote", "dataset.subset=8192"],
    "ensemble": ["method=ensemble", "dataset.subset=4096"],
    # Recorded from issue 22 on (no earlier recording): the post-hoc baselines, VI, a
    # two-fit MultiSWAG and a short HMC on the fmnist_small reference problem.
    "swag": ["method=swag", "dataset.subset=4096"],
    "temperature": ["method=temperature", "dataset.subset=4096"],
    "mc_dropout": ["method=mc_dropout", "model.dropout_rate=0.2", "dataset.subset=4096"],
    "vi": ["method=vi", "dataset.subset=4096"],
    "multi": ["method=multi", "method.fits=2", "dataset.subset=4096"],
    "hmc": [
        "experiment=fmnist_small",
        "method=hmc",
        "method.num_chains=2",
        "method.burn_in=20",
        "method.members_per_chain=20",
    ],
}

# Keys that measure the machine, not the result (see the module docstring).
IGNORE: tuple[str, ...] = (
    "time/*",
    "*/time_*",
    "cost/compile_s",
    "cost/peak_device_mib",
    "*_per_s",
)

# Metric keys renamed on purpose since the reference was recorded: {stored: current}.
# Issue 12: a method's MAP metrics moved from <set>/map_<m> (MC-BN) to map/<set>/<m>.
RENAMES: dict[str, str] = {
    **{
        f"{s}/map_{m}": f"map/{s}/{m}"
        for s in ("test", "val")
        for m in ("acc", "nll", "ece", "brier")
    },
    # issue 22's glossary (docs/glossary.md); bnn_bench.reporting.runs.OLD_KEYS has the same
    "temperature/T": "temperature/logit_temperature",
    "laplace/time_map": "time/map",
    "hmc/warmup_acceptance_rate": "hmc/burn_in_acceptance_rate",
    "hmc/warmup_transitions_per_s": "hmc/burn_in_transitions_per_s",
}

Value = float | int | None | list


def flatten(payload: Mapping[str, Any]) -> dict[str, Value]:
    """metrics.json as one flat dict: its numbers, and its curves as
    ``curves/<split>/<curve>/<column>`` (a list or a number)."""
    flat: dict[str, Value] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        else:
            flat[prefix] = node

    for key, value in payload.items():
        if key == "curves":
            walk("curves", value)
        else:
            flat[key] = value
    return flat


# Keys added to metrics.json after the cases were recorded, with the value every recorded case
# would have had: such a key is no difference when a case lacks it and the new run has exactly
# that value (any other value is reported as ``new``).
ADDED_SINCE_RECORDING: dict[str, Value] = {
    "data/augment": 0.0,  # issue 19: no recorded case augments its training batches
}


def ignored(key: str, patterns: Iterable[str] = IGNORE) -> bool:
    """Whether ``key`` is machine-dependent (matches one of ``patterns``)."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _same(a: Value, b: Value) -> bool:
    """Exact equality (1 == 1.0); NaN equals NaN, lists compare entry by entry."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def compare(
    stored: Mapping[str, Value],
    now: Mapping[str, Value],
    renames: Mapping[str, str] | None = None,
    patterns: Iterable[str] = IGNORE,
) -> list[dict[str, Any]]:
    """The differences between two flat metric dicts, ignored keys left out.

    Args:
      stored: the reference metrics (``flatten`` of the recorded metrics.json).
      now: the metrics of the new run.
      renames: ``{stored key: current key}`` for keys renamed on purpose; the stored
        value is compared with the current key's.
      patterns: fnmatch patterns of keys to leave out (machine-dependent numbers).

    Returns:
      One row per difference, sorted by key: ``{"key", "kind", "stored", "now"}`` with
      kind ``changed``, ``missing`` (stored, not in the new run), ``new`` (only in the
      new run), or ``renamed?`` (a missing key and a new key with the same value; the
      row's key reads ``old -> new``). Empty when the two agree.
    """
    renames = dict(renames or {})
    patterns = tuple(patterns)
    old = {renames.get(k, k): v for k, v in stored.items() if not ignored(k, patterns)}
    new = {
        k: v
        for k, v in now.items()
        if not ignored(k, patterns)
        and not (k not in old and k in ADDED_SINCE_RECORDING and _same(v, ADDED_SINCE_RECORDING[k]))
    }
    rows = [
        {"key": k, "kind": "changed", "stored": old[k], "now": new[k]}
        for k in old.keys() & new.keys()
        if not _same(old[k], new[k])
    ]
    missing = sorted(old.keys() - new.keys())
    added = sorted(new.keys() - old.keys())
    paired: set[str] = set()
    for k in missing:
        twins = [n for n in added if n not in paired and _same(old[k], new[n])]
        if len(twins) == 1:  # unambiguous: one new key holds exactly the old value
            paired.add(twins[0])
            row = {"key": f"{k} -> {twins[0]}", "kind": "renamed?", "stored": old[k]}
            rows.append({**row, "now": new[twins[0]]})
        else:
            rows.append({"key": k, "kind": "missing", "stored": old[k], "now": None})
    rows += [{"key": k, "kind": "new", "stored": None, "now": new[k]} for k in added]
    rows = [r for r in rows if not (r["kind"] == "new" and r["key"] in paired)]
    return sorted(rows, key=lambda r: r["key"])


def _show(value: Value, at: int | None = None) -> str:
    """A value for the table; a list by its entry ``at`` (the first that differs)."""
    if isinstance(value, list):
        if at is not None and at < len(value):
            return f"[{at}] {value[at]!r} (len {len(value)})"
        return f"list (len {len(value)})"
    return "-" if value is None else repr(value)


def _is_num(x: Value) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _first_diff(a: Value, b: Value) -> int | None:
    """The first index where two lists differ (None unless both are lists)."""
    if not (isinstance(a, list) and isinstance(b, list)):
        return None
    pairs = enumerate(zip(a, b, strict=False))  # past the shorter one: its length
    return next((i for i, (x, y) in pairs if not _same(x, y)), min(len(a), len(b)))


def _delta(a: Value, b: Value) -> str:
    """How far apart two numbers (or two equally long lists) are."""
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"length {len(a)} -> {len(b)}"
        pairs = [(x, y) for x, y in zip(a, b, strict=True) if not _same(x, y)]
        nums = [abs(x - y) for x, y in pairs if _is_num(x) and _is_num(y)]
        worst = max(nums, default=None)
        return f"{len(pairs)} entries differ" + (f", max |d| {worst:.3g}" if worst else "")
    if _is_num(a) and _is_num(b):
        rel = abs(a - b) / max(abs(a), abs(b)) if max(abs(a), abs(b)) else 0.0
        return f"{b - a:+.3g} (rel {rel:.2g})"
    return ""


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``compare``'s rows: key, kind, stored, now, difference.
    Numbers are shown in full (repr), so a last-digit change is visible."""
    table = [("key", "kind", "stored", "now", "difference")]
    for r in rows:
        a, b = r["stored"], r["now"]
        at = _first_diff(a, b)
        delta = _delta(a, b) if r["kind"] == "changed" else ""
        table.append((r["key"], r["kind"], _show(a, at), _show(b, at), delta))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    )


def environment() -> dict[str, Any]:
    """What bit-for-bit equality depends on: library versions, CPU, cores, platform."""
    env: dict[str, Any] = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            env[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            env[pkg] = None
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env["cpu"] = cpu
    env["cpu_count"] = os.cpu_count()
    env["jax_platforms"] = os.environ.get("JAX_PLATFORMS", "cpu")
    env["python"] = platform.python_version()
    return env


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "bnn_bench", "conf"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def dump_record(record: Mapping[str, Any]) -> str:
    """A stored file's text: JSON, one line per metric (a curve's list on its line too),
    so that a re-recording reads as a line-per-key diff."""
    head = {k: v for k, v in record.items() if k != "metrics"}
    text = json.dumps(head, indent=1)[:-2]  # drop the closing "\n}"
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in record["metrics"].items()]
    return text + ',\n "metrics": {\n' + ",\n".join(lines) + "\n }\n}\n"


def run_case(overrides: list[str], run_dir: Path, log_path: Path) -> float:
    """Runs the CLI with ``overrides`` into ``run_dir``; returns the wall seconds.

    Raises:
      RuntimeError: the run failed (its output is in ``log_path``).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, "-m", "bnn_bench.cli", *overrides, f"hydra.run.dir={run_dir}"]
    tic = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"exit status {proc.returncode} after {wall:.0f} s:\n{tail}")
    return wall


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--cases", help="comma-separated case names (default: all; see --list)")
    p.add_argument("--record", action="store_true", help="write the stored files from this code")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--out", type=Path, help="keep run folders in OUT/<case> (default: temporary)")
    p.add_argument("--no-run", action="store_true", help="compare OUT/<case>/metrics.json as is")
    p.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="a metric key renamed on purpose (repeatable; adds to RENAMES)",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATTERN",
        help="another fnmatch pattern of keys to leave out (repeatable; say why in the report)",
    )
    p.add_argument("--store", type=Path, default=STORE, help="folder of the stored files")
    args = p.parse_args(argv)
    if args.no_run and args.out is None:
        p.error("--no-run needs --out: the folder holding <case>/metrics.json")
    if args.no_run and args.record:
        p.error("--record runs the cases; it cannot be combined with --no-run")
    for r in args.rename:
        if r.count("=") != 1:
            p.error(f"--rename takes OLD=NEW; got {r!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = list(CASES) if not args.cases else [c.strip() for c in args.cases.split(",")]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    if args.list:
        for n in names:
            print(f"{n}: bnn-bench {' '.join(CASES[n])}".rstrip())
        return 0
    renames = {**RENAMES, **dict(r.split("=", 1) for r in args.rename)}
    patterns = IGNORE + tuple(args.ignore)
    env = environment()
    tmp = tempfile.TemporaryDirectory(prefix="check_regression_") if args.out is None else None
    base = Path(tmp.name) if tmp is not None else args.out
    base.mkdir(parents=True, exist_ok=True)
    status, summary = 0, []
    try:
        for name in names:
            overrides, run_dir = CASES[name], base / name
            print(f"== {name}: bnn-bench {' '.join(overrides)}".rstrip(), flush=True)
            wall = None
            if not args.no_run:
                try:
                    wall = run_case(overrides, run_dir, base / f"{name}.log")
                except RuntimeError as e:
                    print(f"   FAILED: {e}", flush=True)
                    summary.append((name, "run failed", wall))
                    status = max(status, 2)
                    continue
            payload = json.loads((run_dir / "metrics.json").read_text())
            now = flatten(payload)
            store = args.store / f"{name}.json"
            if args.record:
                kept = {k: v for k, v in sorted(now.items()) if not ignored(k, patterns)}
                record = {
                    "case": name,
                    "overrides": overrides,
                    "commit": _git_commit(),
                    "environment": env,
                    "wall_s": None if wall is None else round(wall, 1),
                    "ignored": list(patterns),
                    "metrics": kept,
                }
                store.parent.mkdir(parents=True, exist_ok=True)
                store.write_text(dump_record(record))
                print(f"   recorded {len(kept)} keys in {store} ({wall or 0:.0f} s)", flush=True)
                summary.append((name, "recorded", wall))
                continue
            if not store.exists():
                print(f"   no stored file {store}; record it with --record --cases {name}")
                summary.append((name, "not recorded", wall))
                status = max(status, 1)
                continue
            ref = json.loads(store.read_text())
            if ref["overrides"] != overrides:
                print(f"   note: recorded with overrides {ref['overrides']}")
            drift = {k: (v, env.get(k)) for k, v in ref["environment"].items() if env.get(k) != v}
            if drift:
                print(f"   note: environment differs from the recording's (stored, now): {drift}")
            rows = compare(ref["metrics"], now, renames, patterns)
            if rows:
                print(format_rows(rows), flush=True)
                status = max(status, 1)
            n = sum(1 for k in now if not ignored(k, patterns))
            verdict = f"{len(rows)} difference(s)" if rows else f"same ({n} keys)"
            print(f"   {verdict}" + (f" in {wall:.0f} s" if wall else ""), flush=True)
            summary.append((name, verdict, wall))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print("\n== summary")
    for name, verdict, wall in summary:
        print(f"{name:24s} {verdict:24s} {'' if wall is None else f'{wall:6.0f} s'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
