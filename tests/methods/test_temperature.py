"""``temperature``: the fitted T is the validation-NLL optimum, found independently on a grid."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from scipy.special import log_softmax

from bnn_bench.config import build
from bnn_bench.errors import UserError
from bnn_bench.methods.posthoc.temperature import fit_temperature
from bnn_bench.models import build_model
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg

pytestmark = pytest.mark.e2e

# Low contrast (val acc ~0.7) and over-training: an over-confident MAP, so T > 1 matters
# and the optimum lies inside the range (separable data would drive T to its low end).
SMALL = [
    *TINY,
    "dataset.train_size=1024",
    "dataset.contrast=0.2",
    "trainer.epochs=30",
    "trainer.schedule.init_value=1e-2",
]


@pytest.fixture(scope="module")
def map_dir(tmp_path_factory):
    """A finished tiny `map` run; the temperature fits below start from its network."""
    out = tmp_path_factory.mktemp("map")
    run(compose_cfg(*SMALL), out)
    return out


def _grid_optimum(logits, labels, low=0.05, high=20.0, points=40001):
    """The T on a fine log-spaced grid with the lowest NLL (float64, scipy's log_softmax)."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels)
    ts = np.exp(np.linspace(np.log(low), np.log(high), points))
    nlls = [-log_softmax(z / t, axis=-1)[np.arange(len(y)), y].mean() for t in ts]
    i = int(np.argmin(nlls))
    return ts[i], np.log(high / low) / (points - 1)


def _fit(map_dir, *overrides):
    cfg = compose_cfg(*SMALL, "method=temperature", f"method.init_from={map_dir}", *overrides)
    data = build(cfg.dataset, "dataset").load()
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(module, data.spec, "mlp", cfg.eval.batch_size)
    method = build(cfg.method, "method")
    post = method.fit(jax.random.key(0), model, data)
    return data, model, method, post


def test_fitted_temperature_is_the_grid_optimum_of_validation_nll(map_dir):
    data, model, method, post = _fit(map_dir)
    logits = model.logits(post.params, post.state, data.val.x)
    t_grid, step = _grid_optimum(logits, data.val.y)
    t = float(post.temperature)
    assert abs(np.log(t) - np.log(t_grid)) <= 2 * step, (t, t_grid)
    assert t > 1.2  # the over-trained MAP is over-confident: scaling matters here
    info = post.info
    assert info["temperature/logit_temperature"] == pytest.approx(t)
    assert info["temperature/val_nll"] < info["temperature/val_nll_map"]


def test_members_are_the_tempered_softmax_and_keep_the_map_argmax(map_dir):
    data, model, method, post = _fit(map_dir)
    (probs,) = np.exp(list(method.member_log_probs(jax.random.key(3), post, data.test.x)))
    assert probs.shape == (1, data.test.size, 10)
    logits = np.asarray(model.logits(post.params, post.state, data.test.x), np.float64)
    np.testing.assert_allclose(
        probs[0], np.exp(log_softmax(logits / float(post.temperature), -1)), atol=1e-6
    )
    assert (np.asarray(probs[0]).argmax(-1) == logits.argmax(-1)).all()


def test_recovers_the_temperature_that_generated_the_labels():
    """Labels drawn from softmax(z) and logits 3z: the NLL-optimal T tends to 3."""
    k1, k2 = jax.random.split(jax.random.key(0))
    z = 1.5 * jax.random.normal(k1, (40_000, 5))
    y = jax.random.categorical(k2, z)
    t = fit_temperature(3.0 * np.asarray(z), np.asarray(y))
    assert t == pytest.approx(3.0, rel=0.05)


def test_run_from_a_map_run_reports_t_and_the_map_metrics(map_dir, tmp_path):
    metrics = run(
        compose_cfg(*SMALL, "method=temperature", f"method.init_from={map_dir}"), tmp_path
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["temperature/logit_temperature"] == pytest.approx(
        metrics["temperature/logit_temperature"]
    )
    mapped = json.loads((map_dir / "metrics.json").read_text())
    # the MAP part is the loaded network: its metrics are the map run's
    assert metrics["map/test/acc"] == pytest.approx(mapped["test/acc"])
    assert metrics["map/test/nll"] == pytest.approx(mapped["test/nll"], rel=1e-4)
    assert metrics["test/acc"] == pytest.approx(mapped["test/acc"])  # T keeps the argmax
    assert metrics["val/nll"] < metrics["map/val/nll"]  # fitted there, so it must improve
    assert (tmp_path / "checkpoint" / "map.msgpack").is_file()  # feeds another init_from


def test_refuses_a_dataset_without_validation_split(map_dir):
    with pytest.raises(UserError, match="dataset.val_fraction"):
        _fit(map_dir, "dataset.val_fraction=0")


@pytest.mark.parametrize("bad", ["[2.0,1.0]", "[0.0,5.0]"])
def test_refuses_a_bad_temperature_range(bad):
    cfg = compose_cfg(*SMALL, "method=temperature", f"method.temperature_range={bad}")
    with pytest.raises(UserError, match="temperature_range"):
        build(cfg.method, "method")
