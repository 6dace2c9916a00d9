"""The regression evaluation end to end, on a fake tiny 1-D regression whose members are
closed-form Gaussians: the summary (streamed and under jit, with a sampler's trace), the
task's metrics and curves, ``predictive/`` files, W2 against a reference, the plots and
``metrics.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bnn_bench.data import Dataset, Spec, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation import EvalInputs
from bnn_bench.evaluation import regression as R
from bnn_bench.evaluation import regression_fidelity as RF
from bnn_bench.evaluation.regression_summary import RegressionSummary
from bnn_bench.evaluation.settings import EvalSettings
from bnn_bench.evaluation.tables import metrics_table
from bnn_bench.evaluation.tasks import Classification, Regression, task_of
from bnn_bench.reporting.outputs import write_metrics

pytestmark = pytest.mark.unit

MEAN, STD = 3.0, 2.0  # the target's standardisation: y = MEAN + STD * z
NOISE = 0.3  # σ of z given x


@dataclass(frozen=True)
class RegressionSpec(Spec):
    """A Spec with the regression fields of issue 20 (``Spec.task``, ``target_mean/std``)."""

    task: str = "regression"
    target_mean: float = MEAN
    target_std: float = STD


def _data(n_train=40, n_test=60, n_val=20, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)

    def split(n):
        x = rng.uniform(-2, 2, (n, 1)).astype(np.float32)
        z = np.sin(2 * x[:, 0]) + NOISE * rng.standard_normal(n)
        return Split(jnp.asarray(x), jnp.asarray(z, jnp.float32))

    spec = RegressionSpec("toy", (1, 1, 1), 1, ("y",), (0.0,), (1.0,))
    return Dataset(spec, split(n_train), split(n_test), split(n_val))


def _members(x, s, seed, chains=None):
    """(s, N, 2) standardised (mean, log σ): the true mean plus a member's own offset."""
    rng = np.random.default_rng(seed)
    mean = np.sin(2 * np.asarray(x)[:, 0])[None] + 0.05 * rng.standard_normal((s, 1))
    log_sd = np.full_like(mean, np.log(NOISE))
    return jnp.asarray(np.stack([mean, log_sd], -1), jnp.float32)


def _summaries(task, data, sets, s=8, seed=0, chains=None):
    inputs = EvalInputs(
        {k: v.x for k, v in sets.items()},
        keep=3,
        capacity=64,
        labels={k: v.y for k, v in sets.items()},
        summary=task.summary,
    )
    if chains is None:
        summaries = inputs.empty(2)
        for name, split in sets.items():
            for lo in range(0, s, 3):  # chunks of 3, 3, 2
                members = _members(split.x, s, seed)[lo : lo + 3]
                summaries[name] = summaries[name].add(members)
        return summaries
    summaries = inputs.empty(2, chains=chains, samples=s)
    add = jax.jit(lambda sm, m: sm.add(m))
    for i in range(s):  # one sample per chain per add, as a sampler folds them
        for name, split in sets.items():
            summaries[name] = add(summaries[name], _members(split.x, chains, seed + i))
    return summaries


def test_task_of_branches_on_spec_task():
    data = _data()
    assert isinstance(task_of(data, EvalSettings()), Regression)
    plain = Dataset(
        Spec("img", (2, 2, 1), 3, ("a", "b", "c"), (0.0,), (1.0,)), data.train, data.test
    )
    assert isinstance(task_of(plain, EvalSettings()), Classification)
    with pytest.raises(UserError, match="regression dataset"):
        task_of(data, EvalSettings(shift=["rotate"]))


def test_summary_keeps_members_and_traces_log_likelihood():
    data = _data()
    task = Regression(data, EvalSettings())
    sets = {"test": data.test}
    summaries = _summaries(task, data, sets, s=6, chains=2)
    test = summaries["test"]
    assert isinstance(test, RegressionSummary) and float(test.count) == 12
    draws = test.trace.draws()  # (chains, S, 1 + 2K)
    assert draws.shape == (2, 6, 1 + 2 * 3)
    # quantity 0: the sample's mean test log-likelihood, against scipy
    m = np.asarray(_members(data.test.x, 2, 0 + 5))  # the last sample of both chains
    ref = stats.norm(m[0, :, 0], np.exp(m[0, :, 1])).logpdf(np.asarray(data.test.y)).mean()
    assert draws[0, -1, 0] == pytest.approx(ref, rel=1e-5)
    assert test.kept_log_members().shape == (12, 3, 2)


def test_capacity_drops_members_past_it_and_warns(caplog):
    data = _data()
    task = Regression(data, EvalSettings())
    summary = RegressionSummary.empty(data.test.size, 2, capacity=4)
    summary = summary.add(_members(data.test.x, 6, 0))
    assert summary.kept() == 4 and float(summary.count) == 6
    np.testing.assert_array_equal(
        summary.member_outputs(), np.asarray(_members(data.test.x, 6, 0))[:4]
    )
    mu, _ = task.original(summary)
    assert mu.shape == (4, data.test.size)
    with caplog.at_level("WARNING"):
        metrics, _ = task.evaluate({"test": summary}, {"test": data.test})
    assert metrics["test/members"] == 6 and "eval.keep_members=4" in caplog.text


def test_regression_evaluation_end_to_end(tmp_path):
    data = _data()
    sets = {"test": data.test, "val": data.val}
    task = Regression(data, EvalSettings())
    summaries = _summaries(task, data, sets, s=8, seed=0)
    prints = task.fingerprints(sets)
    metrics, curves = task.evaluate(summaries, sets)
    names = ["members", "rmse", "nll", "crps", "std"]
    names += [f"{k}_{p}" for k in ("coverage", "width") for p in (50, 90, 95)]
    assert set(metrics) == {f"{s}/{k}" for s in ("test", "val") for k in names}
    # the numbers are those of the pure functions on the members in original units
    m = np.asarray(_members(data.test.x, 8, 0), np.float64)
    mu, sd = MEAN + STD * m[..., 0], STD * np.exp(m[..., 1])
    y = MEAN + STD * np.asarray(data.test.y, np.float64)
    assert metrics["test/rmse"] == pytest.approx(R.rmse(mu, y), rel=1e-5)
    assert metrics["test/nll"] == pytest.approx(R.nll(mu, sd, y), rel=1e-5)
    assert metrics["test/members"] == 8
    assert 0.8 <= metrics["test/coverage_95"] <= 1.0  # the members are the data's own law
    assert curves["test"]["calibration"]["expected"][0] == pytest.approx(0.05)

    # the reference: a run that wrote its predictive; scored against itself and another
    ref_dir = tmp_path / "reference"
    task.write_predictive(ref_dir, summaries, prints)
    (ref_dir / "metrics.json").write_text("{}")
    stored = np.load(ref_dir / "predictive" / prints["sets"]["test"]["file"])
    assert stored.shape == (8, data.test.size, 2)
    np.testing.assert_allclose(stored[..., 1], sd, rtol=1e-5)
    with_ref = Regression(data, EvalSettings(reference=str(ref_dir)))
    reference = with_ref.reference(prints, sets)
    same = with_ref.fidelity(reference, summaries)
    assert same["test/w2"] == pytest.approx(0.0, abs=1e-4)
    assert same["test/std_error"] == pytest.approx(0.0, abs=1e-4)
    other = _summaries(task, data, sets, s=8, seed=1)
    scores = with_ref.fidelity(reference, other)
    assert scores["test/w2"] > 1e-3 and set(scores) == {
        f"{s}/{k}" for s in ("test", "val") for k in ("w2", "mean_error", "std_error")
    }

    run_dir = tmp_path / "run"
    pngs = with_ref.plots(
        run_dir / "plots", "Fake · mlp · toy", other, sets, metrics, curves, reference
    )
    assert set(pngs) == {"calibration", "predictive"}
    for png in pngs.values():
        assert png.is_file() and png.stat().st_size > 10_000
    table = metrics_table({**metrics, **scores})  # the run log's table: regression groups
    assert "RMSE" in table and "W2 (competition)" in table and "Classification" not in table
    path = write_metrics(run_dir, {**metrics, **scores}, curves)
    saved = json.loads(path.read_text())
    assert saved["test/crps"] == pytest.approx(metrics["test/crps"])
    assert len(saved["curves"]["val"]["calibration"]["observed"]) == len(R.CALIBRATION_LEVELS)


def test_reference_of_another_target_scaling_is_refused(tmp_path):
    data = _data()
    sets = {"test": data.test}
    task = Regression(data, EvalSettings())
    prints = task.fingerprints(sets)
    task.write_predictive(tmp_path, _summaries(task, data, sets), prints)
    (tmp_path / "metrics.json").write_text("{}")
    moved = {**prints, "target": {"mean": 0.0, "std": 1.0}}
    with pytest.raises(UserError, match="standardised differently"):
        RF.RegressionReference.load(tmp_path, moved)


def test_w2_is_scipy_wasserstein_distance_averaged():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (5, 1000)), rng.normal(0.5, 2, (5, 1000))
    ref = np.mean([stats.wasserstein_distance(p, q) for p, q in zip(a, b, strict=True)])
    assert RF.w2(a, b) == pytest.approx(ref, rel=1e-12)
    # draws: a fixed seed gives the same draws; they follow the mixture
    mu, sd = np.array([[0.0], [4.0]]), np.array([[1.0], [0.5]])
    d = RF.draws(mu, sd, num=20_000)
    np.testing.assert_array_equal(d, RF.draws(mu, sd, num=20_000))
    assert stats.kstest(d[0], lambda t: R.cdf(mu, sd, t[None, :].T)[:, 0]).pvalue > 1e-3
