"""Loggers: history.jsonl always; W&B with the real wandb library, offline."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import wandb

from bnn_bench.reporting.loggers import RunInfo, WandbLogger, curve_table
from tests.conftest import CLI, TINY, cli_env
from tests.reporting.wandb_records import read_run

pytestmark = pytest.mark.e2e


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_wandb_offline_run_holds_config_history_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    env = cli_env() | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(
        [
            *CLI,
            *TINY,
            "trainer.chunk_size=3",
            "seed=3",
            "logger=wandb",
            "logger.project=tests",
            "logger.tags=[a,b]",
            "device.preallocate=false",
            "device.mem_fraction=0.3",
            f"hydra.run.dir={run_dir}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = _history(run_dir)

    (log_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    wb = read_run(log_file)
    assert wb["run"].project == "tests"
    assert list(wb["run"].tags) == ["a", "b"]
    # named from the overrides that say what it computes (not logger.*, device.*)
    assert wb["run"].display_name == ",".join([*TINY, "trainer.chunk_size=3", "seed=3"])
    # the resolved config
    assert wb["config"]["seed"] == 3
    assert wb["config"]["model"]["hidden"] == [32]
    assert wb["config"]["method"]["_target_"] == "bnn_bench.methods.point.map.MAP"
    # the training curve, step for step as in history.jsonl
    train = [(h["_step"], h["train/loss"]) for h in wb["history"] if "train/loss" in h]
    local = [(h["step"], h["train/loss"]) for h in history if "train/loss" in h]
    # 448 training examples / 64 = 7 steps per epoch, chunks of at most 3 within an epoch
    assert [step for step, _ in local] == [3, 6, 7, 10, 13, 14, 17, 20, 21, 24, 27, 28]
    assert train == local
    assert [h["epoch"] for h in history if "val/acc" in h] == [1, 2, 3, 4]
    assert any("val/acc" in h for h in wb["history"])
    # the final metrics in the summary, equal to metrics.json
    for key in (
        "test/acc",
        "test/nll",
        "test/ece",
        "val/acc",
        "time/fit",
        "cost/grad_evals",
        "cost/compile_s",
    ):
        assert wb["summary"][key] == pytest.approx(metrics[key], rel=1e-12)
    # cost next to the result: 4 epochs x 7 steps, one member, compiling took time
    assert metrics["cost/grad_evals"] == 28 and metrics["cost/samples"] == 1
    assert metrics["cost/attempts"] == 1
    assert metrics["cost/compile_s"] > 0
    assert "cost/peak_device_mib" not in metrics  # the CPU backend reports no memory
    # the device settings reached XLA before JAX started (else the CLI warns "too late")
    log = (run_dir / "run.log").read_text()
    assert "XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.3" in log
    assert "too late" not in log
    # the reliability plot as an image, the curves as tables
    assert any(h.get("plots/reliability._type") == "image-file" for h in wb["history"])
    images = list(run_dir.glob("wandb/offline-run-*/files/media/images/plots/*.png"))
    assert any(p.name.startswith("reliability") for p in images)  # every plot, reliability too
    tables = list(
        run_dir.glob("wandb/offline-run-*/files/media/table/curves/test/reliability*.table.json")
    )
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert [row[table["columns"].index("count")] for row in table["data"]] == metrics["curves"][
        "test"
    ]["reliability"]["count"]


def test_online_without_network_goes_offline_quickly(tmp_path, monkeypatch):
    # a key, but a server that refuses connections: must not hang, must log offline
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(project="tests", mode="online")
    tic = time.perf_counter()
    run_id = logger.start(tmp_path, {"seed": 0}, RunInfo(("method=map",)))
    logger.log({"train/loss": 1.5}, step=1)
    logger.finish()
    assert time.perf_counter() - tic < 60
    wandb.teardown()  # finish() may return before wandb-core has flushed the file
    (log_file,) = tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    wb = read_run(log_file)
    assert [h["train/loss"] for h in wb["history"]] == [1.5]


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = WandbLogger(project="tests", mode="offline")
    run_id = first.start(tmp_path, {}, RunInfo())
    first.log({"train/loss": 2.0}, step=1)
    first.finish(ok=False)
    wandb.teardown()  # as a preempted process's exit would
    time.sleep(1.1)  # offline folders are named by the second they start in
    second = WandbLogger(project="tests", mode="offline")
    assert second.start(tmp_path, {}, RunInfo(), run_id=run_id) == run_id
    second.log({"train/loss": 1.0}, step=2)
    second.finish()
    wandb.teardown()  # finish() may return before wandb-core has flushed the file
    files = sorted(tmp_path.glob(f"wandb/offline-run-*-{run_id}/*.wandb"))
    assert len(files) == 2  # two attempts of one run id; `wandb sync` joins them
    logged = [h["train/loss"] for f in files for h in read_run(f)["history"]]
    assert logged == [2.0, 1.0]


def test_run_info_names_and_identity():
    info = RunInfo(
        ("method=psgld", "seed=1", "resume=true", "logger=wandb", "+trainer.steps=5"),
        sweep_dir="outputs/multirun/x",
    )
    assert info.identity() == ["method=psgld", "seed=1", "+trainer.steps=5"]
    assert info.name() == "method=psgld,seed=1,trainer.steps=5"


def test_curve_table_turns_bin_edges_into_lower_and_upper():
    columns, rows = curve_table({"edges": [0.0, 0.5, 1.0], "count": [3, 4], "accuracy": [0.1, 0.9]})
    assert columns == ["edges_lower", "edges_upper", "count", "accuracy"]
    assert rows == [[0.0, 0.5, 3, 0.1], [0.5, 1.0, 4, 0.9]]


def test_bad_mode_is_a_user_error():
    from bnn_bench.errors import UserError

    with pytest.raises(UserError, match="logger.mode"):
        WandbLogger(mode="sometimes")


def test_online_without_api_key_goes_offline(tmp_path, monkeypatch):
    import socket

    server = socket.socket()  # a reachable "server" that never answers
    server.bind(("127.0.0.1", 0))
    server.listen()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    try:
        logger = WandbLogger(project="tests", mode="online", init_timeout=30)
        tic = time.perf_counter()
        run_id = logger.start(tmp_path, {}, RunInfo())
        assert logger.run.offline
        logger.finish()
        assert time.perf_counter() - tic < 60
    finally:
        server.close()
    wandb.teardown()
    assert list(tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
