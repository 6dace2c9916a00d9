"""Run-folder files: atomic .npy writes; the model's name is its config choice."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from bnn_bench.reporting.outputs import config_choice, write_npy_atomic
from tests.conftest import compose_cfg, config_choices

pytestmark = pytest.mark.unit


def test_npy_is_written_whole_and_leaves_no_temporary(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_npy_atomic(tmp_path / "sub" / "a.npy", a)
    np.testing.assert_array_equal(np.load(tmp_path / "sub" / "a.npy"), a)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.npy"]


def test_model_name_is_the_choice_hydra_saved(tmp_path):
    (tmp_path / ".hydra").mkdir()
    saved = {"hydra": {"runtime": {"choices": {"model": "my_mobilenet", "method": "sgld"}}}}
    (tmp_path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(saved))
    node = compose_cfg("model=mobilenet").model
    assert config_choice(tmp_path, "model", node) == "my_mobilenet"


@pytest.mark.parametrize("choice", config_choices("model"))
def test_without_hydra_every_shipped_model_is_named_by_its_choice(tmp_path, choice):
    node = compose_cfg(f"model={choice}").model
    assert config_choice(tmp_path, "model", node) == choice  # mobilenet, not mobilenetv1
