"""Deep ensembles: members differ, and member k is the ``map`` run with seed ``seed*size+k``."""

from __future__ import annotations

import numpy as np

from bnn_bench.config import build
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg

SMALL = [*TINY, "trainer.epochs=2", "dataset.train_size=256", "dataset.test_size=64"]


def test_member_seeds():
    ens = build(compose_cfg(*SMALL, "method=ensemble", "method.size=3", "seed=2").method, "method")
    assert ens.member_seeds() == [6, 7, 8]  # disjoint from seeds 1 (3..5) and 3 (9..11)


def test_members_differ_and_each_is_its_map_run(tmp_path):
    """Through ``run``: member 1 of a size-2 ensemble with seed 1 is ``method=map seed=3``,
    metric for metric; the two members are different networks."""
    ens = run(compose_cfg(*SMALL, "method=ensemble", "method.size=2", "seed=1"), tmp_path / "ens")
    single = run(compose_cfg(*SMALL, "method=map", "seed=3"), tmp_path / "map")
    assert ens["test/members"] == 2.0
    for m in ("acc", "nll", "ece"):
        np.testing.assert_allclose(
            ens[f"test/member_1_{m}"], single[f"test/{m}"], rtol=1e-4, atol=1e-6
        )
    assert abs(ens["test/member_0_nll"] - ens["test/member_1_nll"]) > 1e-3
    # soft voting of two different members is not either member
    assert abs(ens["test/nll"] - ens["test/member_1_nll"]) > 1e-4
