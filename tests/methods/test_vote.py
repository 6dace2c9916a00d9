"""capsa's vote: vmapped voters equal voters trained alone on their slices; batch check;
the voters' std."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.errors import UserError
from bnn_bench.evaluation import PredictiveSummary
from bnn_bench.methods.point.vote import member_std_metrics
from bnn_bench.methods.training import TrainState, epoch_batches, make_chunk_runner
from bnn_bench.models import build_model
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg

pytestmark = pytest.mark.e2e

SMALL = [
    *TINY,
    "dataset.train_size=256",
    "dataset.test_size=64",
    "trainer.chunk_size=1000",
    "method=vote",
    "method.members=4",
]
# ConvMod has dropout, so each voter's dropout keys are checked too.
CONV = [*(o for o in SMALL if not o.startswith("model")), "model=convmod", "trainer.epochs=1"]


def test_vmapped_voters_equal_each_voter_alone_on_its_slice():
    cfg = compose_cfg(*CONV)
    data = build(cfg.dataset, "dataset").load()
    model = build_model(build(cfg.model, "model", num_classes=10), data.spec, "convmod", 128)
    vote = build(cfg.method, "method")
    key = jax.random.key(7)
    post = vote.fit(key, model, data)

    # The reference: the single-model step runner, voter by voter, on the documented keys.
    tr, (k_voters, k_batches) = vote.trainer, jax.random.split(key)
    n, b, voters = data.train.size, tr.batch_size, vote.members
    steps, width = n // b, b // voters
    batches = epoch_batches(jax.random.fold_in(k_batches, 0), n, b)  # (steps, b)
    tx = tr.make_optimizer(steps)
    run_chunk = make_chunk_runner(model, tx)
    for k, vkey in enumerate(jax.random.split(k_voters, voters)):
        k_init, _, k_drop = jax.random.split(vkey, 3)
        params, state = model.init(k_init)
        ts = TrainState(params, state, tx.init(params))
        idx = batches[:, k * width : (k + 1) * width]  # voter k's slice of every batch
        drop = jax.random.split(jax.random.fold_in(k_drop, 0), steps)
        ts, _ = run_chunk(ts, data.train, idx, drop)
        got = jax.tree.map(lambda a, k=k: a[k], post.params)
        jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-5), got, ts.params)
    first = jax.tree.leaves(post.params)[0]
    assert np.abs(np.asarray(first[0] - first[1])).max() > 1e-3  # voters differ


def test_batch_size_must_be_a_multiple_of_voters(tmp_path):
    with pytest.raises(UserError, match="not a multiple of method.members=4"):
        build(compose_cfg(*SMALL, "trainer.batch_size=66").method, "method")
    with pytest.raises(UserError, match="batch_size=64 or 68"):
        run(compose_cfg(*SMALL, "trainer.batch_size=66"), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_member_std_is_the_mean_std_over_voters():
    probs = jax.nn.softmax(3 * jax.random.normal(jax.random.key(0), (5, 40, 3)))  # (S, N, C)
    summary = PredictiveSummary.empty(40, 3).add(jnp.log(probs[:2])).add(jnp.log(probs[2:]))
    spread = member_std_metrics(summary, "test/")
    dense = np.std(np.asarray(probs, np.float64), axis=0).mean(axis=0)  # (C,)
    for c in range(3):
        np.testing.assert_allclose(spread[f"test/member_std_class_{c}"], dense[c], rtol=1e-4)
    np.testing.assert_allclose(spread["test/member_std"], dense.mean(), rtol=1e-4)


def test_run_reports_member_std_per_class(tmp_path):
    metrics = run(compose_cfg(*SMALL), tmp_path)
    assert metrics["test/members"] == 4.0
    spreads = [metrics[f"test/member_std_class_{c}"] for c in range(10)]
    assert all(v >= 0 for v in spreads) and max(spreads) > 0
    assert metrics["test/acc"] > 0.3
    assert {f"test/member_{k}_nll" for k in range(4)} <= set(metrics)
