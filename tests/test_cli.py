"""The CLI as a user meets it: types checked first, one job per run folder, interrupts,
dry runs. Real processes where the behaviour is about processes (locks, signals)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from bnn_bench import run_folder
from bnn_bench.errors import UserError
from bnn_bench.run import run
from tests.conftest import CLI, TINY, cli_env, compose_cfg, config_choices, tiny

pytestmark = pytest.mark.e2e


def _pause(until, step=None) -> list[str]:
    """Overrides that pause the run (tests/pause_logger.py) until the file ``until`` exists."""
    extra = [] if step is None else [f"+logger.step={step}"]
    return ["logger._target_=tests.pause_logger.PauseAt", f"+logger.until={until}", *extra]


def _wait_for(path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


# --- types are checked before any work ------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method=map", "trainer.epochs=abc"], "trainer.epochs: expected an integer, got 'abc'"),
        (["seed=abc"], "seed: expected an integer, got 'abc'"),
    ],
)
@pytest.mark.contract
def test_a_value_of_the_wrong_type_is_refused_with_its_key_before_data_is_read(
    tmp_path, run_cli, overrides, message
):
    # the data source does not exist: reading it would fail with another message
    proc = run_cli(
        *overrides,
        "dataset=mnist",
        "dataset.source=local",
        f"dataset.data_dir={tmp_path / 'no-such-folder'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "Could not find" not in proc.stderr
    assert (tmp_path / "run" / "error.txt").read_text().startswith(message)


@pytest.mark.contract
def test_validate_names_the_key_for_each_kind_of_annotation():
    from bnn_bench.config import validate

    cases = {
        "trainer.epochs=1.5": "trainer.epochs: expected an integer, got 1.5",
        "dataset.resize=[a,4]": "dataset.resize[0]: expected an integer, got 'a'",
        "eval.shift=rotate": "eval.shift: expected a list, got 'rotate'",
        "resume=maybe": "resume: expected true or false or 'auto', got 'maybe'",
        "method.temperature=warm": "method.temperature: expected a number, got 'warm'",
        # a schedule is a _target_ node or a number (a constant step); a word is neither
        "method.step_size=fast": (
            "method.step_size: expected a Schedule (a _target_ node) or a number, got"
        ),
        "dry_run=yes": "dry_run: expected true or false, got 'yes'",
        "objective.direction=up": "objective.direction: expected one of 'minimize', 'maximize'",
    }
    for override, message in cases.items():
        with pytest.raises(UserError) as e:
            validate(
                compose_cfg("method=map", override)
                if "trainer" in override
                else compose_cfg(override)
            )
        assert str(e.value).startswith(message), (override, str(e.value))
    for ok in ("method.epochs=2.5", "method.step_size=3e-7", "dataset.resize=[32,32]"):
        validate(compose_cfg(ok))  # the right types pass
    validate(compose_cfg("method=map", "trainer.epochs=3", "resume=true"))


# --- one job per run folder -----------------------------------------------------------------


def test_a_second_process_on_a_busy_run_folder_is_refused(tmp_path, run_cli):
    folder, go = tmp_path / "run", tmp_path / "go"
    first = subprocess.Popen(
        [*CLI, *TINY, "seed=0", "trainer.chunk_size=3", f"hydra.run.dir={folder}", *_pause(go, 3)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        _wait_for(tmp_path / "go.reached", first)  # the first job is training, lock held
        tic = time.monotonic()
        second = run_cli(*TINY, "seed=1", f"hydra.run.dir={folder}", process=True, timeout=300)
        took = time.monotonic() - tic
        assert second.returncode == 3, second.stderr[-3000:]
        assert f"is in use by pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        # the refused job wrote nothing: the folder still describes the first job only
        assert yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())["seed"] == 0
        assert "in use" not in (folder / "run.log").read_text()
        go.touch()
        _, err = first.communicate(timeout=600)
    finally:
        go.touch()
        first.kill() if first.poll() is None else None
    assert first.returncode == 0, err[-3000:]
    record = json.loads((folder / "checkpoint" / "resume" / "run.json").read_text())
    assert record["config"]["seed"] == 0 and record["attempts"] == 1
    assert yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())["seed"] == 0
    steps = [
        json.loads(line)["step"] for line in (folder / "history.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps[-1] == 28  # one job's history, not two interleaved
    print(f"refused in {took:.1f} s (interpreter start and imports included)")


def test_the_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom bnn_bench import run_folder\n"
            f"with run_folder.folder_lock({str(tmp_path)!r}):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(run_folder.FolderBusy, match=f"pid {holder.pid}"),
            run_folder.folder_lock(tmp_path),
        ):
            pass
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    with run_folder.folder_lock(tmp_path), run_folder.folder_lock(tmp_path):  # re-entrant
        assert (tmp_path / run_folder.LOCK).read_text().startswith(f"pid {os.getpid()}")


def test_a_new_job_in_an_old_run_folder_starts_clean(tmp_path):
    stale = {
        "plots/old_plot.png": "png",
        "predictive/test.npy": "x",
        "samples.msgpack": "x",
        "error.txt": "an old failure",
        "checkpoint/map.msgpack": "another job's network",
        "checkpoint/resume/sgmcmc-0/step_000000001/meta.json": "{}",
        "history.jsonl": '{"step": 1, "stale": true}\n',
        "metrics.json": '{"test/acc": 0.123}',
        "run.log": "a line of the old job\n",
    }
    for name, text in stale.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "checkpoint/resume/run.json").write_text(json.dumps({"config": {"seed": 7}}))

    # another job's finished results are never cleared unasked: refused, nothing touched
    with pytest.raises(UserError, match="holds the finished results .* of another job"):
        run(compose_cfg(*TINY, "trainer.epochs=1"), tmp_path)
    assert all((tmp_path / name).read_text() == text for name, text in stale.items())
    metrics = run(compose_cfg(*TINY, "trainer.epochs=1", "resume=false"), tmp_path)

    for name in ("plots/old_plot.png", "samples.msgpack", "error.txt"):
        assert not (tmp_path / name).exists(), name
    assert np.load(tmp_path / "predictive/test.npy").shape == (256, 10)  # this job's
    assert not (tmp_path / "checkpoint/resume/sgmcmc-0").exists()
    assert (tmp_path / "checkpoint/map.msgpack").read_bytes() != b"another job's network"
    assert "stale" not in (tmp_path / "history.jsonl").read_text()
    assert "old job" not in (tmp_path / "run.log").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]
    assert (tmp_path / "plots" / "reliability.png").is_file()


# --- interrupts -----------------------------------------------------------------------------


def _resume_command(stderr: str) -> list[str]:
    line = next(ln for ln in stderr.splitlines() if "To continue: bnn-bench " in ln)
    return shlex.split(line.split("To continue: bnn-bench ", 1)[1])


def test_ctrl_c_in_a_loop_checkpoints_prints_the_resume_command_and_exits_130(tmp_path, run_cli):
    folder, go = tmp_path / "run", tmp_path / "go"
    proc = subprocess.Popen(
        [*CLI, *TINY, "trainer.chunk_size=3", f"hydra.run.dir={folder}", *_pause(go, 6)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    _wait_for(tmp_path / "go.reached", proc)  # paused between two chunks of the trainer
    proc.send_signal(signal.SIGINT)
    go.touch()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "stopped by SIGINT after saving step 6" in err
    assert not (folder / "metrics.json").exists()

    again = run_cli(*_resume_command(err))  # the printed command, as printed
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming trainer from step 6" in (folder / "run.log").read_text()
    assert (folder / "metrics.json").is_file()


def test_a_signal_outside_a_loop_stops_with_one_line_and_the_resume_command(tmp_path):
    folder, go = tmp_path / "run", tmp_path / "go"
    proc = subprocess.Popen(
        [*CLI, *TINY, "trainer.epochs=1", f"hydra.run.dir={folder}", *_pause(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    _wait_for(tmp_path / "go.reached", proc)  # training and prediction done, in the summary
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "stopped by SIGTERM" in ln]
    assert len(lines) == 1 and f"hydra.run.dir={folder}" in lines[0]
    assert not (folder / "metrics.json").exists()


def test_result_files_are_written_with_the_users_umask(tmp_path):
    """metrics.json and run.json were 0600 (tempfile's mode) whatever the umask."""
    old = os.umask(0o027)
    try:
        run(compose_cfg(*TINY, "trainer.epochs=1"), tmp_path / "run")
    finally:
        os.umask(old)
    files = {p.relative_to(tmp_path / "run"): p.stat().st_mode & 0o777
             for p in (tmp_path / "run").rglob("*") if p.is_file()}  # fmt: skip
    assert Path("metrics.json") in files and Path("checkpoint/resume/run.json") in files
    assert {p: m for p, m in files.items() if m != 0o640} == {}


# --- dry runs -------------------------------------------------------------------------------


def test_dry_run_plans_the_work_the_run_then_does_and_writes_nothing(tmp_path):
    overrides = [*TINY, "trainer.epochs=2", "dataset.val_fraction=0.25"]
    plan = run(compose_cfg(*overrides, "dry_run=true"), tmp_path / "dry")
    assert not (tmp_path / "dry").exists()  # nothing written, not even the folder
    metrics = run(compose_cfg(*overrides), tmp_path / "real")
    assert plan["plan/grad_evals"] == metrics["cost/grad_evals"] == plan["plan/steps"] > 0
    assert plan["plan/members"] == metrics["test/members"] == 1
    assert plan["plan/params"] == metrics["model/params"]
    assert plan["plan/test_size"] == 256 and plan["plan/val_size"] == 128  # 25% of 512
    assert plan["plan/device_mib"] > 0


def _batch_norm(method: str) -> list[str]:
    """tiny(method) on a LeNet with batch norm."""
    return [o for o in tiny(method) if not o.startswith("model")] + [
        "model=lenet",
        "model.norm=batchnorm",
    ]


# Configs refused before any work, each with words of its message. Each is refused by the
# run and by its dry run alike (one ``dry_run.check``), with the same message.
REFUSED = {
    "negative subset": (
        ["method=map", "dataset=fashion_mnist", "dataset.subset=-5"],
        "dataset.subset must be > 0, got -5",
    ),
    "zero subset": (
        ["method=map", "dataset=mnist", "dataset.subset=0"],
        "dataset.subset must be > 0, got 0",
    ),
    "split": ([*TINY, "dataset.val_fraction=1.5"], "dataset.val_fraction must be in [0, 1)"),
    "resize": ([*TINY, "dataset.resize=[0,4]"], "dataset.resize[0] must be > 0, got 0"),
    "batch": ([*TINY, "trainer.batch_size=5000"], "trainer.batch_size=5000 is larger than"),
    "sampler, batch norm": (_batch_norm("sgld"), "method=sgld needs a model without"),
    "hmc, batch norm": (_batch_norm("hmc"), "method=hmc needs a model without"),
    "mcbn without": ([*tiny("mcbn")], "method=mcbn needs a model with batch norm"),
    "mcbn batch": (
        [*_batch_norm("mcbn"), "method.mc_batch_size=5000"],
        "method.mc_batch_size=5000 is larger than",
    ),
    "no dropout": ([*tiny("mc_dropout"), "model.dropout_rate=0"], "needs a model with dropout"),
    "CIFAR-10-C": ([*TINY, "eval.shift=[cifar10c_fog]"], "eval.shift=cifar10c_fog is CIFAR-10-C"),
    "local": (
        ["method=map", "dataset=mnist", "dataset.source=local"],
        "dataset.source=local needs",
    ),
}


@pytest.mark.contract
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_run_and_its_dry_run_refuse_the_same_things_with_the_same_message(
    tmp_path, plan_only, case
):
    overrides, words = REFUSED[case]
    messages = []
    for dry in (False, True):
        folder = tmp_path / ("dry" if dry else "run")
        with pytest.raises(UserError) as e:
            run(compose_cfg(*overrides, f"dry_run={str(dry).lower()}"), folder)
        messages.append(str(e.value))
        assert not folder.exists()  # refused before anything was written
    assert messages[0] == messages[1]
    assert words in messages[0], messages[0]


def test_a_bad_subset_is_refused_by_the_command_naming_its_key(tmp_path, run_cli):
    """The issue's command: a negative subset trained on 53,995 examples and exited 0."""
    proc = run_cli(
        "method=map",
        "dataset.subset=-5",
        "trainer.steps=5",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "dataset.subset must be > 0, got -5" in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
    # its dry run: the same line, and not even the folder Hydra made for it is left (a real
    # process: the folder goes when the refused run exits, by sys.exit(2))
    dry = run_cli("method=map", "dataset.subset=-5", "trainer.steps=5", "dry_run=true",
                  f"hydra.run.dir={tmp_path / 'dry' / 'run'}", process=True)  # fmt: skip
    errors = [[ln for ln in p.stderr.splitlines() if "error:" in ln] for p in (proc, dry)]
    assert dry.returncode == 2 and errors[0] == errors[1] and len(errors[0]) == 1
    assert not (tmp_path / "dry").exists()


@pytest.mark.contract
def test_an_old_key_on_the_command_line_is_one_line_naming_the_new(run_cli):
    """config.RENAMED through the real entry point: Hydra refuses method.size (no such key
    in conf/method/multi.yaml) and the one line names multi's own new name."""
    proc = run_cli("method=multi", "method.size=5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.endswith(
        "method.size was renamed to method.fits (docs/glossary.md); use method.fits=5."
    )


@pytest.mark.contract
def test_a_key_only_some_swept_methods_have_is_one_line_naming_them(tmp_path, run_cli):
    """`-m method=map,sgld method.members_per_chain=10` got Hydra's "not in struct"; now one
    line names the methods without the key, and the fix it suggests composes."""
    from bnn_bench.overrides import explain
    from tests.conftest import CONF

    proc = run_cli("-m", "method=map,sgld", "method.members_per_chain=10",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert "method=map has no such key (method=sgld has it)" in line
    fix = line.split("Launch the jobs apart: ")[1].split(", and ")[0]
    assert fix == "method=sgld method.members_per_chain=10"
    assert compose_cfg(*fix.split()).method.members_per_chain == 10
    line = explain(["method=sgld", "method.members_per_chian=10"], CONF)
    assert "Did you mean method.members_per_chain=10?" in line
    assert explain(["method=sgld", "method.members_per_chain=10"], CONF) is None


def test_a_key_under_a_group_with_no_keys_names_what_to_do_instead():
    """`experiment.epochs=3` without a preset said "experiment.* applies to method=" (an
    empty list), and `likelihood.foo=3` ended "Its keys: ."; now each names what exists."""
    from bnn_bench.overrides import explain
    from tests.conftest import CONF

    line = explain(["experiment.epochs=3"], CONF)
    presets = line.split("experiment=<name>: ")[1].split(")")[0].split(", ")
    assert presets == config_choices("experiment") and "applies to method=)" not in line
    assert "Did you mean method.epochs=3?" in line
    line = explain(["likelihood.foo=3"], CONF)
    assert line.endswith("It takes no keys.") and "Its keys: ." not in line


@pytest.mark.contract
def test_dry_run_sweep_lists_the_jobs_that_would_fail(tmp_path, run_cli):
    sweep = tmp_path / "sweep"
    tic = time.monotonic()
    proc = run_cli(
        "-m",
        "dry_run=true",
        "dataset=synthetic",
        "method=map,sgld",
        "model=lenet",
        "model.norm=batchnorm",  # as mobilenet's use_bn=true: batch norm, which SG-MCMC refuses
        f"hydra.sweep.dir={sweep}",
    )
    took = time.monotonic() - tic
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout.count("dry run (nothing was trained or written)") == 1  # map's plan
    assert "dry run: 2 job(s) checked, 1 would fail." in proc.stdout
    failed = proc.stderr.split("these jobs would fail:")[1]
    assert "#1 [" in failed and "method=sgld" in failed and "method=map" not in failed
    assert "method=sgld needs a model without batch norm" in failed and "#0" not in failed
    assert not sweep.exists()  # not even Hydra's folders, run.log or multirun.yaml
    print(f"2-job dry-run sweep: {took:.1f} s")


@pytest.mark.parametrize("part,choice", [("launcher", "submitit_local"), ("sweeper", "tune")])
@pytest.mark.contract
def test_dry_run_refuses_another_launcher_or_sweeper(tmp_path, run_cli, part, choice):
    proc = run_cli("-m", "dry_run=true", f"hydra/{part}={choice}", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"drop the hydra/{part} override" in proc.stderr
