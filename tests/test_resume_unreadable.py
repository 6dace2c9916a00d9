"""``resume`` never silently starts over: an unreadable snapshot falls back to an older
readable one, saying so; with none readable, ``resume=true`` stops naming the file and
``resume=auto`` says in one warning that the loop starts over."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import numpy as np
import pytest

from bnn_bench.checkpoint import Checkpointer
from bnn_bench.errors import UserError
from bnn_bench.run import run
from tests.conftest import CLI, TINY, cli_env, compose_cfg
from tests.test_checkpoint import _assert_same, _state

pytestmark = pytest.mark.e2e


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(300))


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _missing(path):
    path.unlink()


CORRUPT = [_random_bytes, _truncated, _empty, _missing]


@pytest.mark.parametrize("corrupt", CORRUPT)
def test_an_unreadable_newest_snapshot_falls_back_to_the_older_one_and_says_so(
    tmp_path, caplog, corrupt
):
    Checkpointer(tmp_path, keep=2).save(1, _state(1))
    Checkpointer(tmp_path, keep=2).save(2, _state(2))
    bad = tmp_path / "step_000000002" / "state.msgpack"
    corrupt(bad)
    with caplog.at_level(logging.WARNING, logger="bnn_bench.checkpoint"):
        step, restored = Checkpointer(tmp_path, resume=True).restore(_state(0))
    assert step == 1
    _assert_same(restored, _state(1))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(bad) in warning and "step_000000001" in warning
    # set aside: the loop's own save of step 2 is written and is the newest again
    assert (tmp_path / "unreadable-step_000000002").is_dir()
    Checkpointer(tmp_path).save(2, _state(5))
    _assert_same(Checkpointer(tmp_path).restore(_state(0))[1], _state(5))


@pytest.mark.parametrize("corrupt", CORRUPT)
def test_with_no_readable_snapshot_resume_true_refuses_and_auto_starts_over(
    tmp_path, caplog, corrupt
):
    Checkpointer(tmp_path).save(3, _state(3))
    bad = tmp_path / "step_000000003" / "state.msgpack"
    corrupt(bad)
    with pytest.raises(UserError, match="resume=false") as e:
        Checkpointer(tmp_path, resume=True).restore(_state(0))
    assert f"checkpoint {bad} is unreadable" in str(e.value)
    assert (tmp_path / "step_000000003").is_dir()  # resume=true touches nothing

    with caplog.at_level(logging.WARNING, logger="bnn_bench.checkpoint"):
        assert Checkpointer(tmp_path, resume="auto").restore(_state(0)) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(bad) in warning and "starts over from step 0" in warning
    assert not (tmp_path / "step_000000003").exists()  # set aside, not pruning new saves


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A TINY run folder as a run killed after its loop's last save leaves it: the
    trainer's snapshot at step 28, no metrics.json."""
    out = tmp_path_factory.mktemp("run") / "run"
    run(compose_cfg(*TINY, "checkpoint.every=1"), out)
    (out / "metrics.json").unlink()
    return out


def _copy_corrupted(interrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    bad = out / "checkpoint/resume/trainer/step_000000028/state.msgpack"
    _truncated(bad)
    return out, bad


@pytest.mark.slow
def test_resume_true_with_an_unreadable_snapshot_exits_2_naming_the_file(interrupted, tmp_path):
    out, bad = _copy_corrupted(interrupted, tmp_path)
    proc = subprocess.run(
        [*CLI, *TINY, "checkpoint.every=1", "resume=true", f"hydra.run.dir={out}"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (error,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert f"checkpoint {bad} is unreadable" in error and "resume=false" in error
    assert not (out / "metrics.json").exists()
    assert bad.is_file()  # kept as it was


@pytest.mark.slow
def test_resume_auto_with_an_unreadable_snapshot_warns_and_trains_from_step_0(
    interrupted, tmp_path, caplog
):
    out, bad = _copy_corrupted(interrupted, tmp_path)
    with caplog.at_level(logging.WARNING):
        run(compose_cfg(*TINY, "checkpoint.every=1", "resume=auto"), out)
    warnings = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
    assert len(warnings) == 1 and "starts over from step 0" in warnings[0]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in history if "train/loss" in h]
    assert steps == [7, 14, 21, 28] * 2  # history appends: the second attempt trained again
    assert (out / "metrics.json").is_file()
