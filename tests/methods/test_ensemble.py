"""Deep ensembles: members differ, and member k is the ``map`` fit of key ``split(key, K)[k]``."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.methods.point.map import MAP
from bnn_bench.methods.training import Trainer
from bnn_bench.models import build_model
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg

pytestmark = pytest.mark.e2e

SMALL = [*TINY, "trainer.epochs=2", "dataset.train_size=256", "dataset.test_size=64"]


def test_members_differ_and_each_is_the_map_fit_of_its_key():
    cfg = compose_cfg(*SMALL, "method=ensemble", "method.members=2")
    data = build(cfg.dataset, "dataset").load()
    model = build_model(build(cfg.model, "model", num_classes=10), data.spec, "mlp", 128)
    ens = build(cfg.method, "method")
    key = jax.random.key(5)
    probs = np.exp(
        np.concatenate(list(ens.member_log_probs(key, ens.fit(key, model, data), data.test.x)))
    )
    trainer: Trainer = ens.trainer
    single = MAP(trainer).fit(jax.random.split(key, 2)[1], model, data)
    np.testing.assert_allclose(
        probs[1],
        np.exp(next(MAP(trainer).member_log_probs(key, single, data.test.x))[0]),
        atol=1e-5,
    )
    assert np.abs(probs[0] - probs[1]).max() > 1e-3  # the members are different networks


def test_run_reports_each_member_beside_the_ensemble(tmp_path):
    ens = run(compose_cfg(*SMALL, "method=ensemble", "method.members=2", "seed=1"), tmp_path)
    assert ens["test/members"] == 2.0 and ens["cost/samples"] == 2.0
    assert abs(ens["test/member_0_nll"] - ens["test/member_1_nll"]) > 1e-3
    # soft voting of two different members is not either member
    assert abs(ens["test/nll"] - ens["test/member_1_nll"]) > 1e-4
