"""GPU hygiene: XLA memory settings reach JAX before it starts; TF stays off the GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import CLI, TINY, cli_env

pytestmark = pytest.mark.e2e


def test_importing_the_cli_does_not_start_jax():
    # the CLI sets XLA_PYTHON_CLIENT_* from the config in main(); that only works if
    # nothing before it (imports included) has started JAX's backend
    code = (
        "import bnn_bench.cli, bnn_bench.run\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_device_settings_are_applied_before_jax_starts():
    code = (
        "import os, sys\n"
        "from omegaconf import OmegaConf\n"
        "from bnn_bench.cli import configure_device\n"
        "env = configure_device(OmegaConf.create({'preallocate': False, 'mem_fraction': 0.3}))\n"
        "import jax; jax.numpy.zeros(1).block_until_ready()\n"
        "print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'],"
        " os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["false", "0.3"]
    assert "too late" not in proc.stderr

    # through the CLI: tests/reporting/test_loggers.py checks run.log of a real run


def test_bad_memory_fraction_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [*CLI, *TINY, "device.mem_fraction=1.5", f"hydra.run.dir={tmp_path}"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "device.mem_fraction must be in (0, 1]" in proc.stderr


def test_tensorflow_is_kept_off_the_gpu_before_tfds_starts_it(tmp_path):
    # read_tfds must hide the GPUs from TensorFlow before tensorflow_datasets (and with it
    # TensorFlow) is imported; afterwards TF's device list can no longer be changed
    (tmp_path / "mnist").mkdir()
    code = (
        "import sys\n"
        "from bnn_bench.data import sources\n"
        "calls = []\n"
        "real = sources.keep_tensorflow_off_gpu\n"
        "def spy():\n"
        "    calls.append('tensorflow_datasets' in sys.modules)\n"
        "    real()\n"
        "sources.keep_tensorflow_off_gpu = spy\n"
        "try:\n"
        f"    sources.read_tfds('mnist', {str(tmp_path)!r}, download=False)\n"
        "except sources.DataNotFound:\n"
        "    pass\n"
        "import tensorflow as tf\n"
        "gpus = tf.config.get_visible_devices('GPU')\n"
        "print(calls, 'tensorflow_datasets' in sys.modules, gpus)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # called once, before tfds was imported; tfds was imported after; TF sees no GPU
    assert proc.stdout.strip().splitlines()[-1] == "[False] True []"
