"""Plots from summaries: every plot for several members; S = 1 skips member plots."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import matplotlib.image as mpimg
import numpy as np
import pytest

from bnn_bench import evaluation
from bnn_bench.data import Split, SyntheticDataset
from bnn_bench.evaluation.summary import PredictiveSummary
from bnn_bench.reporting import plots

pytestmark = pytest.mark.unit

MEMBER_PLOTS = {"member_boxplots", "accuracy_over_certainty", "member_std_extremes"}
ALWAYS = {
    "reliability",
    "accuracy_vs_threshold",
    "risk_coverage",
    "uncertain_per_class",
    "uncertain_images",
    "shift",
    "ood_scores",
}


def _fake_run(members: int):
    data = SyntheticDataset(test_size=64, train_size=16, val_fraction=0.0).load()
    rng = np.random.default_rng(0)
    y = np.asarray(data.test.y)
    logits = 3 * np.eye(10)[y][None] + rng.standard_normal((members, 64, 10))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    def summary(p):
        return PredictiveSummary.empty(p.shape[1], 10, keep_idx=range(5), capacity=50).add(
            jnp.log(jnp.asarray(p, jnp.float32))
        )

    test = summary(probs)
    if members > 1:  # as a sampler folds them: 2 chains, one sample of each per add
        test = PredictiveSummary.empty(
            64, 10, range(5), 50, labels=y, chains=2, samples=members // 2
        )
        for i in range(0, members, 2):
            test = test.add(jnp.log(jnp.asarray(probs[i : i + 2], jnp.float32)))
    summaries = {
        "test": test,
        "ood": summary(probs[:, ::-1] * 0 + 0.1),
        "shift/rotate/90": summary(probs[:, ::-1]),
    }
    sets = {"test": data.test, "ood": Split(data.test.x, data.test.y), "shift/rotate/90": data.test}
    metrics, curves = evaluation.evaluate(summaries, {"test": y, "ood": None, "shift/rotate/90": y})
    return data, summaries, sets, metrics, curves


@pytest.mark.parametrize("members", [1, 6])
def test_write_all_draws_each_plot(members, tmp_path, caplog):
    data, summaries, sets, metrics, curves = _fake_run(members)
    with caplog.at_level(logging.INFO, logger="bnn_bench.reporting.plots"):
        out = plots.write_all(
            tmp_path, "Fake · mlp · synthetic", summaries, sets, metrics, curves, data.spec
        )
    expected = ALWAYS | (MEMBER_PLOTS | {"traces"} if members > 1 else set())
    assert ("test/rhat" in metrics and "test/ess" in metrics) == (members > 1)
    assert set(out) == expected
    for path in out.values():
        image = mpimg.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 200  # a real, non-empty figure
        assert image[..., :3].std() > 0.01
    assert ("S = 1" in caplog.text) == (members == 1)
