"""Sweeps: the launcher configs, a failed job in a sweep (basic and submitit_local
launchers), re-launching a multirun (the same command, another value list), the Optuna
sweeper, and the checks before a launch (a read-only folder, SLURM without sbatch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from omegaconf import OmegaConf

from tests.conftest import CLI, ROOT, TINY, cli_env

pytestmark = pytest.mark.e2e


def _job(sweep, *overrides: str):
    """The folder of the sweep's one job whose overrides include ``overrides``, or None."""
    found = [
        m.parent.parent
        for m in sweep.glob("*/.hydra/overrides.yaml")
        if set(overrides) <= set(OmegaConf.load(m))
    ]
    assert len(found) <= 1, found
    return found[0] if found else None


def _hydra_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


FAKE_SBATCH = """#!/bin/sh
# stands in for SLURM's sbatch: keeps the submission script, answers with a job id
cp "$1" "$SBATCH_CAPTURE"
echo "Submitted batch job 4242"
"""


@pytest.mark.contract
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
    bad, good = _job(sweep, "dataset.resize=[4,4]"), _job(sweep, "dataset.resize=[28,28]")
    error = (bad / "error.txt").read_text()
    assert "cannot take synthetic inputs of shape (4, 4, 1)" in error
    assert not (bad / "metrics.json").exists()
    assert (good / "metrics.json").is_file() and not (good / "error.txt").exists()
    # the end of the command lists the failed job, its folder and overrides, and only it
    listing = first.stderr.split("job(s) of this sweep failed:")[1]
    assert f"{bad}  [" in listing and "dataset.resize=[4,4]" in listing
    assert str(good) not in listing
    assert f"hydra.sweep.dir={sweep}" in listing
    if launcher == "submitit_local":  # each job ran as its own submitit job
        assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2
        return

    # re-launched: the finished job is skipped, the failed one runs (and fails) again
    done = (good / "metrics.json").read_bytes()
    before = (bad / "error.txt").stat().st_mtime_ns
    again = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 1, again.stderr[-3000:]
    assert (good / "metrics.json").read_bytes() == done
    assert "skipping" in (good / "run.log").read_text()
    assert (bad / "error.txt").stat().st_mtime_ns > before
    assert str(bad) in again.stderr.split("failed:")[1]


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
            "method.members_per_chain=4",
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
    seed0 = _job(sweep, "seed=0")
    done = (seed0 / "metrics.json").read_bytes()
    done_mtime = (seed0 / "metrics.json").stat().st_mtime_ns
    assert not (_job(sweep, "seed=1") / "metrics.json").exists()
    assert _job(sweep, "seed=2") is None  # never started

    again = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # seed 0 was skipped: its results are untouched
    assert (seed0 / "metrics.json").read_bytes() == done
    assert (seed0 / "metrics.json").stat().st_mtime_ns == done_mtime
    assert "skipping" in (seed0 / "run.log").read_text()
    # seed 1 continued from its checkpoint, seed 2 ran
    assert "resuming trainer from step 13" in (_job(sweep, "seed=1") / "run.log").read_text()
    for seed in (1, 2):
        metrics = json.loads((_job(sweep, f"seed={seed}") / "metrics.json").read_text())
        assert metrics["cost/grad_evals"] == 28


def test_relaunching_with_another_value_list_keeps_every_finished_result(tmp_path):
    """The issue's reproduction, small: seeds 0,1, then seeds 1 alone. With job folders named
    by their number, the second launch's job 0 (seed 1) cleared seed 0's results and compare
    counted seed 1 twice."""
    from bnn_bench.reporting.compare import compare

    sweep = tmp_path / "sweep"
    base = [*CLI, "-m", *[o for o in TINY if not o.startswith("trainer.epochs")]]
    base += ["trainer.epochs=1", f"hydra.sweep.dir={sweep}"]
    first = subprocess.run([*base, "seed=0,1"], env=cli_env(), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    folders = {s: _job(sweep, f"seed={s}") for s in (0, 1)}
    before = {s: (f / "metrics.json").read_bytes() for s, f in folders.items()}
    mtimes = {s: (f / "metrics.json").stat().st_mtime_ns for s, f in folders.items()}

    again = subprocess.run([*base, "seed=1"], env=cli_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    for s, folder in folders.items():  # seed 1 skipped, seed 0 untouched
        assert (folder / "metrics.json").read_bytes() == before[s]
        assert (folder / "metrics.json").stat().st_mtime_ns == mtimes[s]
    assert "skipping" in (folders[1] / "run.log").read_text()
    assert "skipping" not in (folders[0] / "run.log").read_text()
    report, _ = compare([sweep], out=tmp_path / "cmp", plots=False)
    assert "2 runs in 1 groups" in report and "| all | 2 |" in report
    assert "status: 2 of 2 jobs finished." in report

    # another job in a finished job's folder is refused in one line, nothing touched
    overrides = (folders[0] / ".hydra" / "overrides.yaml").read_bytes()
    single = [*CLI, *TINY, "trainer.epochs=1"]
    other = subprocess.run(
        [*single, "seed=5", f"hydra.run.dir={folders[0]}"],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert other.returncode == 2, other.stderr[-3000:]
    (line,) = other.stderr.strip().splitlines()
    assert f"{folders[0]} holds the finished results (metrics.json) of another job" in line
    assert "its config differs in seed" in line and "resume=false" in line
    assert (folders[0] / "metrics.json").read_bytes() == before[0]
    assert (folders[0] / ".hydra" / "overrides.yaml").read_bytes() == overrides
    assert not (folders[0] / "error.txt").exists()

    # a broken run.json: one line naming it; no error.txt in the finished folder
    run_json = folders[1] / "checkpoint" / "resume" / "run.json"
    run_json.write_text(run_json.read_text()[:20])
    broken = subprocess.run([*base, "seed=1"], env=cli_env(), capture_output=True, text=True)
    assert broken.returncode == 1, broken.stderr[-3000:]
    assert f"{run_json} is unreadable (JSONDecodeError" in broken.stderr
    assert "Traceback" not in broken.stderr
    assert str(folders[1]) in broken.stderr.split("job(s) of this sweep failed:")[1]
    assert not (folders[1] / "error.txt").exists()
    assert (folders[1] / "metrics.json").read_bytes() == before[1]


def _without_write_permission(cmd: list[str]) -> list[str]:
    """``cmd`` run so that folder permissions hold (root ignores them: drop its override)."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: file permissions cannot be enforced")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *cmd]


@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_a_read_only_output_folder_is_one_line_and_exit_2(tmp_path, mode):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    key = "hydra.run.dir" if mode == "run" else "hydra.sweep.dir"
    cmd = [*CLI, *(["-m", "seed=0,1"] if mode == "sweep" else []), *TINY, f"{key}={locked}/x"]
    proc = subprocess.run(
        _without_write_permission(cmd), env=cli_env(), capture_output=True, text=True
    )
    locked.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert f"{locked} is not writable (Permission denied)" in line and f"{key}=<folder>" in line
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])
def test_a_slurm_launcher_without_slurm_is_one_line_and_exit_2(tmp_path, launcher):
    env = cli_env() | {"PATH": str(tmp_path)}  # no sbatch on it
    sweep = tmp_path / "sweep"
    cmd = [*CLI, "-m", f"hydra/launcher={launcher}", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert f"hydra/launcher={launcher} submits the jobs to SLURM" in line
    assert "no sbatch on the PATH" in line
    assert not sweep.exists()  # nothing submitted, nothing written
