"""Sweeps: the launcher configs, a failed job in a sweep (basic and submitit_local
launchers), re-launching a multirun, the Optuna sweeper."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from omegaconf import OmegaConf

from tests.conftest import CLI, ROOT, TINY, cli_env


def _hydra_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


FAKE_SBATCH = """#!/bin/sh
# stands in for SLURM's sbatch: keeps the submission script, answers with a job id
cp "$1" "$SBATCH_CAPTURE"
echo "Submitted batch job 4242"
"""


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
    # no SLURM here: fake sbatch and srun on the PATH, then submit through submitit's
    # public API with the parameters the launcher hands it (slurm_ prefix for non-base keys)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_CAPTURE", str(tmp_path / "submitted.sh"))
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"),
        cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    job = executor.submit(print, "hello")
    assert job.job_id == "4242"
    sbatch = (tmp_path / "submitted.sh").read_text()
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


# job 0 cannot work (a 3x3 convolution on 4x4 images pooled to 1x1), job 1 can
BAD_AND_GOOD = [
    *(o for o in TINY if not o.startswith(("model", "trainer.epochs"))),
    "model=cnn",
    "trainer.epochs=1",
    "dataset.resize=[4,4],[28,28]",
]


@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_a_failed_job_leaves_error_txt_and_the_sweep_goes_on(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    cmd = [*CLI, "-m", f"hydra/launcher={launcher}", *BAD_AND_GOOD, f"hydra.sweep.dir={sweep}"]
    first = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 1, first.stderr[-3000:]
    error = (sweep / "0" / "error.txt").read_text()
    assert "cannot take synthetic inputs of shape (4, 4, 1)" in error
    assert not (sweep / "0" / "metrics.json").exists()
    assert (sweep / "1" / "metrics.json").is_file() and not (sweep / "1" / "error.txt").exists()
    # the end of the command lists the failed job, its folder and overrides, and only it
    listing = first.stderr.split("job(s) of this sweep failed:")[1]
    assert f"{sweep / '0'}  [" in listing and "dataset.resize=[4,4]" in listing
    assert str(sweep / "1") not in listing
    assert f"hydra.sweep.dir={sweep}" in listing
    if launcher == "submitit_local":  # each job ran as its own submitit job
        assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2
        return

    # re-launched: the finished job is skipped, the failed one runs (and fails) again
    done = (sweep / "1" / "metrics.json").read_bytes()
    before = (sweep / "0" / "error.txt").stat().st_mtime_ns
    again = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 1, again.stderr[-3000:]
    assert (sweep / "1" / "metrics.json").read_bytes() == done
    assert "skipping" in (sweep / "1" / "run.log").read_text()
    assert (sweep / "0" / "error.txt").stat().st_mtime_ns > before
    assert str(sweep / "0") in again.stderr.split("failed:")[1]


def test_the_optuna_sweeper_tunes_sgld_on_the_validation_split(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            *CLI,
            "-m",
            "hydra/sweeper=tune",
            "hydra.sweeper.n_trials=3",
            "dataset=synthetic",
            "dataset.train_size=512",
            "dataset.test_size=128",
            "model=mlp",
            "model.hidden=[16]",
            "method=sgld",
            "method.batch_size=64",
            "method.epochs=2",
            "method.burn_in_epochs=1",
            "method.accepted_samples=4",
            "eval.plots=false",
            "method.step_size.step_size=tag(log,interval(1e-5,1e-3))",
            "method.temperature=interval(0.1,1.0)",
            f"hydra.sweep.dir={sweep}",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = {}
    for d in sweep.iterdir():
        if (d / "metrics.json").is_file():
            method = OmegaConf.load(d / ".hydra" / "config.yaml").method
            key = (method.step_size.step_size, method.temperature)
            trials[key] = json.loads((d / "metrics.json").read_text())["val/nll"]
    assert len(trials) == 3
    assert all(1e-5 <= eps <= 1e-3 and 0.1 <= t <= 1.0 for eps, t in trials)
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    best = min(trials, key=trials.get)  # objective: val/nll, minimised; never a test metric
    assert result.best_value == pytest.approx(trials[best])
    assert result.best_params["method.step_size.step_size"] == pytest.approx(best[0])
    assert result.best_params["method.temperature"] == pytest.approx(best[1])


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
