"""The ``bnn-bench`` command: Hydra composes the config, ``run`` does the work."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bnn_bench import checkpoint, presets, run_folder
from bnn_bench.checkpoint import Preempted
from bnn_bench.config import check_fields
from bnn_bench.errors import UserError
from bnn_bench.overrides import explain, refuse_trainer
from bnn_bench.run import run
from bnn_bench.schema import Device
from bnn_bench.sweep import record_dry_run, record_refused, write_error

_HERE = Path(__file__).resolve().parent
# An installed wheel carries conf/ inside the package; a source checkout has it beside.
CONF = str(_HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf")

log = logging.getLogger("bnn_bench")
HYDRA_GROUPS = ("hydra/launcher", "hydra/sweeper")  # the Hydra groups --help lists
# folders of YAMLs that other YAMLs compose, not groups to choose from (the SG-MCMC base)
NOT_CHOICES = ("method/sampling",)


def help_groups() -> str:
    """The config groups and their choices, for ``--help`` (an OmegaConf resolver that
    ``conf/config.yaml``'s help template calls): the app's groups, without the presets'
    per-method and per-choice files (``experiment/<preset>/...``), and Hydra's launchers
    and sweepers (``hydra/launcher``, ``hydra/sweeper``)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    loader = GlobalHydra.instance().config_loader()
    lines: dict[str, str] = {}

    def walk(parent: str) -> None:
        for name in sorted(loader.list_groups(parent)):
            group = f"{parent}/{name}" if parent else name
            if (
                group.startswith("experiment/")
                or group in NOT_CHOICES
                or (group.startswith("hydra/") and group not in HYDRA_GROUPS)
            ):
                continue
            options = sorted(loader.get_group_options(group, ObjectType.CONFIG))
            if options and group != "hydra":
                lines[group] = f"{group}: {', '.join(options)}"
            walk(group)

    walk("")
    return "".join(lines[g] + "\n" for g in sorted(lines, key=lambda g: (g[:6] == "hydra/", g)))


# --help's list of config groups and their choices (conf/config.yaml's help template)
OmegaConf.register_new_resolver("bnn_bench_groups", help_groups, replace=True)


def configure_device(device: DictConfig) -> dict[str, str]:
    """Sets XLA's GPU memory variables from ``device`` (checked against
    ``schema.Device`` first); they only take effect before JAX starts its backend,
    which nothing has done yet when the CLI calls this."""
    from jax._src import xla_bridge

    check_fields(device, Device, "device")
    env = {}
    if device.preallocate is not None:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true" if device.preallocate else "false"
    if device.mem_fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(float(device.mem_fraction))
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if changed and xla_bridge.backends_are_initialized():
        log.warning("device settings %s come too late: JAX has started already.", changed)
    os.environ.update(env)
    if env:
        log.info("device: %s", " ".join(f"{k}={v}" for k, v in env.items()))
    return env


def _error(message: str) -> None:
    for handler in logging.getLogger().handlers:  # keep the reason in run.log too
        if isinstance(handler, logging.FileHandler):
            handler.emit(
                logging.makeLogRecord(
                    {
                        "name": "bnn_bench",
                        "levelno": logging.ERROR,
                        "levelname": "ERROR",
                        "msg": message,
                    }
                )
            )
    print(f"bnn-bench: {message}", file=sys.stderr)


def _detach_file_logs() -> None:
    """Stops logging into the run folder's run.log (a dry run, or a folder held by
    another process, must not write there)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def _resume_hint(out_dir: Path) -> str:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return f"re-launch the same command with hydra.sweep.dir={hc.sweep.dir}"
    return f"bnn-bench {' '.join(hc.overrides.task)} hydra.run.dir={out_dir}"


def _objective(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a Hydra sweeper optimises: ``metrics[objective.metric]``."""
    value = metrics.get(cfg.objective.metric)
    if value is None:
        log.warning(
            "objective.metric=%s is not in metrics.json, so a sweeper gets no value; "
            "keys like it: %s",
            cfg.objective.metric,
            ", ".join(k for k in metrics if k.endswith(cfg.objective.metric.split("/")[-1])),
        )
        return None
    return float(value)


def _check_preset(cfg: DictConfig) -> None:
    """Refuses ``trainer.*`` on the command line of a method that does not train
    (``overrides.refuse_trainer``), and a group chosen on the command line that the
    preset's settings replace (``presets.check``), composing the same choices without the
    preset to compare."""
    hc = HydraConfig.get()
    refuse_trainer(cfg, hc.runtime.choices.get("method"), list(hc.overrides.task), CONF)
    presets.check(
        cfg,
        hc.runtime.choices,
        list(hc.overrides.task),
        lambda overrides: hydra.compose("config", overrides),
        CONF,
    )


def _dry_run(cfg: DictConfig, out_dir: Path) -> None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    overrides = list(HydraConfig.get().overrides.task)
    _detach_file_logs()
    try:
        _check_preset(cfg)
        with checkpoint.stop_on_signals():
            run(cfg, out_dir)
    except UserError as e:
        record_dry_run(out_dir, overrides, str(e))
        _error(f"error: {e}")
        if not multirun:
            sys.exit(2)
        return
    record_dry_run(out_dir, overrides, None)


def _job(cfg: DictConfig, out_dir: Path) -> float | None:
    """One job in its locked run folder. A failure writes error.txt (not into a folder
    holding finished results: those stay as they are); in a multirun the job then
    returns (None) so that the launcher goes on with the next one."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        _check_preset(cfg)
        with checkpoint.stop_on_signals():  # SIGTERM, Ctrl-C: checkpoint, then stop
            configure_device(cfg.device)
            metrics = run(cfg, out_dir)
    except Exception as e:  # noqa: BLE001 - every failure of a job is recorded the same way
        finished = (out_dir / run_folder.METRICS).is_file()
        if finished:  # the finished run's run.log is not this job's either
            _detach_file_logs()
        if isinstance(e, UserError):
            message = str(e)
        else:
            log.exception("the job failed")  # the traceback goes to run.log
            message = f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}"
        if finished:
            record_refused(out_dir, list(HydraConfig.get().overrides.task), message)
        else:
            write_error(out_dir, message)
        _error(f"error: {message.splitlines()[0] if not isinstance(e, UserError) else e}")
        if not multirun:
            sys.exit(2 if isinstance(e, UserError) else 1)
        return None
    return _objective(cfg, metrics)


@hydra.main(version_base=None, config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> float | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("dry_run") is True:
        _dry_run(cfg, out_dir)
        return None
    try:
        with run_folder.folder_lock(out_dir):  # one job per run folder
            return _job(cfg, out_dir)
    except run_folder.FolderBusy as e:
        _detach_file_logs()
        print(f"bnn-bench: error: {e}", file=sys.stderr)
        sys.exit(3)
    except Preempted as e:
        _error(f"{e}. To continue: {_resume_hint(out_dir)}")
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed
        _error(f"stopped by SIGINT. To continue: {_resume_hint(out_dir)}")
        sys.exit(130)


def entry() -> None:
    """The ``bnn-bench`` command: runs ``main``. When Hydra cannot compose the command's
    config because of an override key (e.g. ``trainer.*`` for a method that does not
    train, a key only some swept methods have), one line from ``overrides.explain``
    replaces Hydra's "Key ... is not in struct" (exit 2); Hydra reports anything else."""
    from hydra._internal.utils import run_and_report
    from hydra.errors import ConfigCompositionException

    user_choice = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us, unprinted
    try:
        main()
    except Exception as e:  # noqa: BLE001 - reported below, as Hydra would
        message = explain(sys.argv[1:], CONF) if isinstance(e, ConfigCompositionException) else None
        if message is not None:
            print(f"bnn-bench: error: {message}", file=sys.stderr)
            sys.exit(2)
        if user_choice is not None:
            raise
        del os.environ["HYDRA_FULL_ERROR"]
        error = e

        def again() -> None:
            raise error

        run_and_report(again)  # Hydra's own short report, then exit 1
    finally:
        if user_choice is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    entry()
