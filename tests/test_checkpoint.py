"""Checkpoint and resume: atomic saves, SIGTERM mid-run, resumed == uninterrupted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.checkpoint import Checkpointer
from bnn_bench.errors import UserError
from bnn_bench.run_folder import RunRecord
from tests.conftest import CLI, ROOT, TINY, cli_env
from tests.reporting.wandb_records import read_run

pytestmark = pytest.mark.e2e

# 7 steps per epoch in chunks of at most 3: chunks end at steps 3, 6, 7, 10, 13, 14, ...
RUN = [*TINY, "trainer.chunk_size=3", "checkpoint.every=2"]
# W&B offline, and SIGTERM at step 13 (a test-only subclass of the W&B logger)
WANDB = ["logger=wandb", "logger.mode=offline"]
SIGTERM_LOGGER = [
    *WANDB,
    "logger._target_=tests.reporting.sigterm_logger.WandbSigtermAt",
    "+logger.sigterm_step=13",
]


class State(NamedTuple):
    params: dict
    key: jax.Array
    count: jax.Array


def _state(seed: int) -> State:
    k = jax.random.key(seed)
    return State(
        {"w": jax.random.normal(k, (3, 2)), "b": jnp.arange(2.0)},
        jax.random.split(k)[0],
        jnp.asarray(seed, jnp.int32),
    )


def _assert_same(a, b):
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(
            jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
            jax.random.key_data(y) if jnp.issubdtype(y.dtype, jax.dtypes.prng_key) else y,
        ),
        a,
        b,
    )


def test_save_and_restore_roundtrip_with_typed_keys(tmp_path):
    ckpt = Checkpointer(tmp_path / "loop", every=2, keep=1)
    assert ckpt.restore(_state(0)) is None
    ckpt.maybe_save(5, _state(1))  # chunk 1: not yet
    assert ckpt.steps() == []
    ckpt.maybe_save(10, _state(2))  # chunk 2: saved
    ckpt.maybe_save(15, _state(3))
    ckpt.maybe_save(20, _state(4), final=True)  # the end is always saved
    assert ckpt.steps() == [20]  # keep=1: older ones are gone
    step, restored = Checkpointer(tmp_path / "loop").restore(_state(0))
    assert step == 20
    _assert_same(restored, _state(4))
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(_state(0).key)
    # draws from the restored key equal draws from the saved one
    np.testing.assert_array_equal(
        jax.random.normal(restored.key, (4,)), jax.random.normal(_state(4).key, (4,))
    )


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    Checkpointer(tmp_path).save(1, _state(0))
    other = State({"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}, jax.random.key(0), jnp.zeros(()))
    with pytest.raises(UserError, match="shape"):
        Checkpointer(tmp_path).restore(other)


class Reordered(NamedTuple):  # State's fields in another order
    count: jax.Array
    key: jax.Array
    params: dict


def test_state_is_keyed_by_tree_path_with_dtypes_kept(tmp_path):
    saved = _state(4)._replace(count=jnp.asarray(7, jnp.int16))
    Checkpointer(tmp_path).save(3, {"a": saved, "half": jnp.ones(2, jnp.bfloat16)})
    # reordered fields: each leaf comes back under its own name, not by position
    template = Reordered(jnp.zeros((), jnp.int16), jax.random.key(0), _state(0).params)
    step, restored = Checkpointer(tmp_path).restore(
        {"a": template, "half": jnp.zeros(2, jnp.bfloat16)}
    )
    assert step == 3
    _assert_same(restored["a"].params, saved.params)
    _assert_same(restored["a"].key, saved.key)
    assert restored["a"].count.dtype == jnp.int16 and int(restored["a"].count) == 7
    assert restored["half"].dtype == jnp.bfloat16


def test_a_renamed_field_or_another_dtype_fails_loudly(tmp_path):
    Checkpointer(tmp_path).save(1, {"prob_sum": jnp.ones(3), "prob_sq_sum": jnp.full(3, 2.0)})
    with pytest.raises(UserError, match=r"missing \[\"\['prob_sq'\]\"\]"):
        Checkpointer(tmp_path).restore({"prob_sum": jnp.ones(3), "prob_sq": jnp.ones(3)})
    with pytest.raises(UserError, match="float32, this run's state int32"):
        Checkpointer(tmp_path).restore(
            {"prob_sum": jnp.ones(3, jnp.int32), "prob_sq_sum": jnp.ones(3)}
        )


def test_each_loop_has_its_own_named_slot(tmp_path):
    from bnn_bench import checkpoint

    session = checkpoint.Session(tmp_path, every=1)
    session.loop("trainer").save(2, _state(2))
    session.loop("sgmcmc").save(5, _state(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sgmcmc", "trainer"]
    with pytest.raises(ValueError, match="trainer"):
        session.loop("trainer")  # two loops never share a folder


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
    (tmp_path / "step_000000002" / "state.msgpack").write_bytes(b"\x00garbage")
    step, restored = Checkpointer(tmp_path).restore(_state(0))
    assert step == 1
    _assert_same(restored, _state(1))


@pytest.mark.parametrize("where", ["while writing the state", "before the rename"])
def test_dying_while_writing_leaves_the_previous_checkpoint_usable(tmp_path, where):
    script = textwrap.dedent(f"""
        import os
        import jax.numpy as jnp
        from bnn_bench import checkpoint
        ckpt = checkpoint.Checkpointer({str(tmp_path)!r}, keep=1)
        ckpt.save(1, {{"w": jnp.full((1000,), 1.0)}})
        if {where!r} == "while writing the state":
            def half(path, data):  # write half the bytes, then die as SIGKILL would leave it
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                os._exit(9)
            checkpoint._write = half
        else:
            os.replace = lambda a, b: os._exit(9)
        ckpt.save(2, {{"w": jnp.full((1000,), 2.0)}})
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=cli_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 9, proc.stderr
    assert list(tmp_path.glob(".tmp-*"))  # the half-written one is there...
    ckpt = Checkpointer(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))  # ...and cleaned up on the next start
    step, tree = ckpt.restore({"w": jnp.zeros((1000,))})
    assert step == 1 and float(tree["w"].sum()) == 1000.0


def _cli(*overrides, check=True):
    proc = subprocess.run(
        [*CLI, *overrides],
        env=cli_env() | {"WANDB_SILENT": "true"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _results(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        k: v
        for k, v in metrics.items()
        if not k.startswith(("time/", "cost/compile", "cost/attempts"))
    }


def test_sigterm_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _cli(*RUN, f"hydra.run.dir={whole}")

    proc = _cli(*RUN, *SIGTERM_LOGGER, f"hydra.run.dir={parts}", check=False)
    assert proc.returncode == 143, proc.stderr[-3000:]  # 128 + SIGTERM
    assert "stopped by SIGTERM after saving step 13" in proc.stderr
    assert f"hydra.run.dir={parts}" in proc.stderr  # how to continue
    assert not (parts / "metrics.json").exists()
    saved = sorted(p.name for p in (parts / "checkpoint/resume/trainer").iterdir())
    assert saved == ["step_000000013"]  # the SIGTERM save replaced step 10's

    _cli(*RUN, *WANDB, "resume=true", f"hydra.run.dir={parts}")
    assert "resuming trainer from step 13" in (parts / "run.log").read_text()
    record = json.loads((parts / "checkpoint/resume/run.json").read_text())
    assert record["attempts"] == 2
    history = [json.loads(line) for line in (parts / "history.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in history if "train/loss" in h]
    assert steps == [3, 6, 7, 10, 13, 14, 17, 20, 21, 24, 27, 28]  # no step trained twice

    # the resumed run continued the same W&B run: two offline attempts of one run id
    attempts = sorted(parts.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(attempts) == 2
    assert {p.stem for p in attempts} == {f"run-{record['logger_run_id']}"}
    logged = [[h["_step"] for h in read_run(p)["history"] if "train/loss" in h] for p in attempts]
    assert logged == [steps[:5], steps[5:]]

    assert json.loads((parts / "metrics.json").read_text())["cost/attempts"] == 2
    expected, got = _results(whole), _results(parts)
    assert got.keys() == expected.keys()
    assert got == expected  # bit-identical metrics, curves included


def test_run_record_decide(tmp_path):
    config = {"seed": 0, "method": {"x": 1}, "logger": {"a": 1}, "resume": "auto"}
    record = RunRecord(tmp_path)
    assert record.decide(config, "auto") == "new"
    with pytest.raises(UserError, match="holds no checkpoint"):
        record.decide(config, True)
    record.start(config, "new")
    record.set_logger_run_id("abc")
    (record.root / "trainer").mkdir()
    record = RunRecord(tmp_path)
    assert record.logger_run_id == "abc"
    # how-to-run keys (logger, resume) do not make it another job
    assert record.decide({**config, "logger": {"b": 2}, "resume": True}, "auto") == "resume"
    assert record.decide({**config, "seed": 1}, "auto") == "new"  # another job: afresh
    assert record.decide({**config, "seed": 1}, True) == "resume"  # unless insisted
    assert record.decide(config, False) == "new"
    (tmp_path / "metrics.json").write_text("{}")
    assert record.decide(config, "auto") == "skip"
    # another job never clears finished results on its own: refused, naming what differs
    with pytest.raises(UserError, match=r"holds the finished results .*differs in seed\)"):
        record.decide({**config, "seed": 1}, "auto")
    assert record.decide({**config, "seed": 1}, False) == "new"  # resume=false: replace them
    record.start({**config, "seed": 1}, "new")  # a rerun clears the old job's results
    assert not (tmp_path / "metrics.json").exists() and not (record.root / "trainer").exists()


@pytest.mark.parametrize("broken", [b'{"config": {"se', b"\xff\xfe\x00", b"[1, 2]"])
def test_an_unreadable_run_json_is_named(tmp_path, broken):
    record = RunRecord(tmp_path)
    record.start({"seed": 0}, "new")
    record.path.write_bytes(broken)
    named = re.escape(str(record.path))
    with pytest.raises(UserError, match=f"{named} is unreadable .*afresh there"):
        RunRecord(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")  # finished: keep or replace, both named
    with pytest.raises(UserError, match="another folder .*delete the file and run with resume"):
        RunRecord(tmp_path)


def test_submitit_preemption_signal_saves_first_then_hands_over(tmp_path):
    import os
    import signal

    from bnn_bench import checkpoint

    requeued = []

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        requeued.append(signum)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with checkpoint.Session(tmp_path, every=0) as session:
            ckpt = session.loop("sgmcmc")
            assert ckpt.restore(_state(0)) is None
            os.kill(os.getpid(), signal.SIGUSR2)  # caught: the loop finishes its chunk
            assert requeued == []
            with pytest.raises(SystemExit):
                ckpt.maybe_save(7, _state(7))
            assert requeued == [signal.SIGUSR2]
            step, restored = Checkpointer(tmp_path / "sgmcmc").restore(_state(0))
            assert step == 7
            _assert_same(restored, _state(7))
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # handed back
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_sigterm_outside_a_loop_stops_at_once(tmp_path):
    import os
    import signal

    from bnn_bench import checkpoint

    with (
        checkpoint.Session(tmp_path, every=1),
        pytest.raises(checkpoint.Preempted, match="SIGTERM"),
    ):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):  # the handler raises at the next bytecode boundary
            pass
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_streaming_summaries_roundtrip(tmp_path):
    # a sampler's checkpoint holds its predictive summaries next to its state
    from bnn_bench.evaluation import EvalInputs

    x = jnp.zeros((6, 4, 4, 1), jnp.uint8)
    inputs = EvalInputs({"test": x, "val": x[:3]}, keep=2, capacity=3)
    summaries = inputs.empty(5)
    log_probs = jax.nn.log_softmax(jax.random.normal(jax.random.key(1), (2, 6, 5)))
    summaries["test"] = summaries["test"].add(log_probs)
    summaries["val"] = summaries["val"].add(log_probs[:, :3])
    tree = {"state": _state(3), "summaries": summaries}
    Checkpointer(tmp_path).save(40, tree)
    step, restored = Checkpointer(tmp_path).restore(
        {"state": _state(0), "summaries": inputs.empty(5)}
    )
    assert step == 40
    _assert_same(restored, tree)
    np.testing.assert_allclose(
        restored["summaries"]["test"].mean(), jnp.exp(log_probs).mean(0), rtol=1e-6
    )
