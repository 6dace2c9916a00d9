"""scripts/gpu_check.py runs end to end (``--tiny``, on the CPU) and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_env

pytestmark = pytest.mark.e2e


def test_gpu_check_tiny_reports_every_figure(tmp_path):
    # minutes on a shared 2-core CPU: five compiled pipelines, two more runs of narrowed
    # residual networks
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in (
        "psgld_burn_in_steps_per_s",
        "psgld_sampling_steps_per_s",
        "bare_value_and_grad_steps_per_s",
        "map_cnn_steps_per_s",
        "ensemble5_cnn_steps_per_s",
        "resnet20_frn_map_steps_per_s",
        "wrn28_10_map_steps_per_s",
    ):
        assert figures[key] > 0, key
    for key in ("peak_device_mib", "resnet20_frn_peak_device_mib", "wrn28_10_peak_device_mib"):
        if cli_env()["JAX_PLATFORMS"] == "cpu":  # the CPU backend reports no device memory
            assert figures[key].startswith("n/a"), key
        else:
            assert figures[key] > 0, key
    assert "psgld warm-up / bare gradient" in proc.stdout


def test_gpu_check_has_help():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--help"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert proc.returncode == 0 and "--tiny" in proc.stdout and "value_and_grad" in proc.stdout
