"""Sweeps: the launcher configs, a submitit_local multirun, re-launching a multirun."""

from __future__ import annotations

import json
import subprocess

from omegaconf import OmegaConf

from tests.conftest import CLI, ROOT, TINY, cli_env


def _hydra_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_asks_for_one_gpu_a_time_limit_and_requeue(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = _hydra_cfg(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=90",
        f"hydra.sweep.dir={tmp_path}",
    )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    # no SLURM here: pretend srun exists, then build the executor as the launcher's launch() does
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=params.pop("submitit_folder"),
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -c pass", "uid")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --time=90",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --mem=32GB",
        "#SBATCH --ntasks-per-node=1",
    ):
        assert line in sbatch, sbatch


def test_submitit_local_multirun_runs_both_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            *CLI,
            "-m",
            "hydra/launcher=submitit_local",
            *TINY,
            "trainer.epochs=1",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert all(0.0 <= m["test/acc"] <= 1.0 for m in metrics)
    assert metrics[0]["test/nll"] != metrics[1]["test/nll"]  # two seeds, two runs
    # each job ran as its own submitit job with its own log
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2


def test_relaunching_an_interrupted_multirun_skips_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        *CLI,
        "-m",
        *TINY,
        "trainer.chunk_size=3",
        "checkpoint.every=2",
        "seed=0,1,2",
        f"hydra.sweep.dir={sweep}",
        # preempt job 1 (seed 1) at step 13, the first time only
        "logger._target_=tests.reporting.sigterm_logger.SigtermAt",
        "+logger.step=13",
        "+logger.seed=1",
        f"+logger.once={tmp_path / 'preempted'}",
    ]
    first = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 143, first.stderr[-3000:]
    assert f"re-launch the same command with hydra.sweep.dir={sweep}" in first.stderr
    done = (sweep / "0" / "metrics.json").read_bytes()
    done_mtime = (sweep / "0" / "metrics.json").stat().st_mtime_ns
    assert not (sweep / "1" / "metrics.json").exists()
    assert not (sweep / "2" / "metrics.json").exists()  # never started

    again = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # job 0 was skipped: its results are untouched
    assert (sweep / "0" / "metrics.json").read_bytes() == done
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == done_mtime
    assert "skipping" in (sweep / "0" / "run.log").read_text()
    # job 1 continued from its checkpoint, job 2 ran
    assert "resuming trainer from step 13" in (sweep / "1" / "run.log").read_text()
    for job in ("1", "2"):
        assert json.loads((sweep / job / "metrics.json").read_text())["cost/grad_evals"] == 28
