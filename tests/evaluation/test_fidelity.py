"""Fidelity to a reference run: agreement and total variation against direct formulas,
every run's predictive files, eval.reference through ``run``, refusals of other data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.errors import UserError
from bnn_bench.evaluation import fidelity
from bnn_bench.evaluation import metrics as M
from bnn_bench.run import run
from tests.conftest import ROOT, TINY, cli_env, compose_cfg, documentation

pytestmark = pytest.mark.e2e

P = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.0, 0.0, 1.0]])
Q = np.array([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.2, 0.7], [0.0, 0.0, 1.0]])


def test_agreement_and_total_variation_against_direct_formulas():
    # top-1: P -> 0, 1, 2, 2; Q -> 0, 2, 2, 2: three of four agree
    assert M.agreement(P, Q) == 0.75
    # ½ Σ|p - q| per row: 0.1, 0.2, 0.3, 0 -> mean 0.15
    assert M.total_variation(P, Q) == pytest.approx(0.15, abs=1e-15)
    rng = np.random.default_rng(0)
    a, b = rng.dirichlet(np.ones(10), 500), rng.dirichlet(np.ones(10), 500)
    direct_agree = np.mean([np.argmax(a[i]) == np.argmax(b[i]) for i in range(500)])
    direct_tv = np.mean([0.5 * sum(abs(a[i, c] - b[i, c]) for c in range(10)) for i in range(500)])
    assert M.agreement(a, b) == pytest.approx(direct_agree, abs=1e-15)
    assert M.total_variation(a, b) == pytest.approx(direct_tv, rel=1e-12)
    assert M.agreement(a, a) == 1.0 and M.total_variation(a, a) == 0.0


def test_one_nll_on_the_host_and_inside_jit():
    y = np.array([0, 2, 1, 2])
    direct = -np.mean(np.log([0.7, 0.4, 0.3, 1.0]))
    assert M.nll(P, y) == pytest.approx(direct, rel=1e-15)
    assert float(M.nll(jnp.asarray(P, jnp.float32), jnp.asarray(y), xp=jnp)) == pytest.approx(
        direct, rel=1e-6
    )
    # leading axes (chains) are averaged as well; a zero probability is clipped at 1e-12
    two = np.stack([P, Q])
    by_hand = -np.mean(np.log(np.clip(two[:, np.arange(4), y], 1e-12, None)))
    assert float(M.nll(jnp.asarray(two), jnp.asarray(y), xp=jnp)) == pytest.approx(by_hand, 1e-6)
    assert M.nll(P, [1, 0, 0, 0]) == pytest.approx(
        -np.mean(np.log([0.2, 0.1, 0.3, 1e-12])), rel=1e-15
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return out, run(compose_cfg(*TINY), out)


def test_every_run_keeps_its_predictive_with_fingerprints(reference_run):
    out, _ = reference_run
    prints = json.loads((out / "predictive" / "fingerprints.json").read_text())
    assert set(prints["sets"]) == {"test", "val"}
    assert prints["train"]["num_inputs"] == 512 - 51  # synthetic val_fraction 0.1 of train
    for fp in prints["sets"].values():
        probs = np.load(out / "predictive" / fp["file"])
        assert probs.dtype == np.float32 and probs.shape == (fp["num_inputs"], 10)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    # the saved predictive is the one the metrics were computed from
    test = np.load(out / "predictive" / "test.npy")
    assert test.shape[0] == 256  # TINY's test_size
    assert metrics["test/acc"] == pytest.approx(
        np.mean(test.argmax(-1) == _labels("test")), abs=1e-12
    )
    # metrics.json is written last
    newest = max(p.stat().st_mtime_ns for p in (out / "predictive").iterdir())
    assert (out / "metrics.json").stat().st_mtime_ns >= newest


def _labels(name):
    from bnn_bench.config import build

    data = build(compose_cfg(*TINY).dataset, "dataset").load()
    return np.asarray(data.test.y if name == "test" else data.val.y)


def test_a_run_scored_against_itself_agrees_fully(reference_run, tmp_path):
    ref, _ = reference_run
    metrics = run(compose_cfg(*TINY, f"eval.reference={ref}"), tmp_path)
    for name in ("test", "val"):
        assert metrics[f"{name}/agreement"] == 1.0
        assert metrics[f"{name}/total_variation"] == 0.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test/agreement"] == 1.0 and saved["test/total_variation"] == 0.0
    documented = set(re.findall(r"`([a-z0-9_<>/]+)`", documentation()))
    assert {"<set>/agreement", "<set>/total_variation", "<set>/rhat", "<set>/ess"} <= documented


@pytest.mark.parametrize(
    ("override", "says"),
    [
        # another dataset: images of another shape
        ("dataset.shape=[32,32,1]", "images of shape [32, 32, 1] against [28, 28, 1]"),
        # another dataset of the same shape
        ("dataset.data_seed=1", "different inputs and labels"),
        # another subset of the test set
        ("dataset.test_size=128", "set test differs between"),
        # another split of the training data
        (
            "dataset.val_fraction=0.2",
            "training split differs between this run (synthetic) and the reference "
            "(synthetic): 410 inputs against 461",
        ),
    ],
)
def test_a_reference_of_other_data_is_refused_before_fit(
    reference_run, tmp_path, override, says, monkeypatch
):
    ref, _ = reference_run
    from bnn_bench.methods.point.map import MAP

    def no_fit(*args, **kwargs):
        raise AssertionError("fit ran before the reference was checked")

    monkeypatch.setattr(MAP, "fit", no_fit)
    with pytest.raises(UserError, match="eval.reference") as err:
        run(compose_cfg(*TINY, override, f"eval.reference={ref}"), tmp_path)
    assert says in str(err.value)
    assert "another dataset, subset or split" in str(err.value)


def test_a_reference_without_predictive_is_refused(reference_run, tmp_path):
    with pytest.raises(UserError, match="holds no metrics.json"):
        run(compose_cfg(*TINY, f"eval.reference={tmp_path}"), tmp_path / "run")
    with pytest.raises(UserError, match="no such run folder"):
        run(compose_cfg(*TINY, f"eval.reference={tmp_path / 'nowhere'}"), tmp_path / "run")


def test_reference_must_be_a_path():
    from bnn_bench.config import build

    with pytest.raises(UserError, match="eval.reference must be a run folder"):
        build(compose_cfg("eval.reference=[1,2]").eval, "eval")


@pytest.fixture(scope="module")
def reference_14x14(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference_14x14")
    run(compose_cfg(*TINY, "dataset.resize=[14,14]"), out)
    return out


def test_a_reference_fed_resized_inputs_is_refused_and_the_same_resize_accepted(
    reference_14x14, tmp_path
):
    # The stored uint8 images are the same; only what the model sees differs.
    with pytest.raises(UserError, match="feed the model different inputs") as err:
        run(compose_cfg(*TINY, f"eval.reference={reference_14x14}"), tmp_path / "28")
    assert (
        "images of shape [28, 28, 1] (dataset.resize=null) against [14, 14, 1] "
        "(dataset.resize=[14,14])" in str(err.value)
    )
    metrics = run(
        compose_cfg(*TINY, "dataset.resize=[14,14]", f"eval.reference={reference_14x14}"),
        tmp_path / "14",
    )
    assert metrics["test/agreement"] == 1.0 and metrics["test/total_variation"] == 0.0


def test_a_reference_of_other_normalisation_or_an_old_one_is_refused(reference_run, tmp_path):
    ref, _ = reference_run
    prints = json.loads((ref / "predictive" / "fingerprints.json").read_text())
    mine = {**prints, "preprocess": {**prints["preprocess"], "std": [0.3]}}
    with pytest.raises(UserError, match=r"different inputs: std \[0.3\] against \[0.25\]"):
        fidelity.shared_sets(mine, prints, "eval.reference=x")
    old = {k: v for k, v in prints.items() if k != "preprocess"}
    with pytest.raises(UserError, match="reference's fingerprints.json does not record"):
        fidelity.shared_sets(prints, old, "eval.reference=x")


def _damaged_copy(ref, tmp_path, name: str, damage) -> tuple:
    copy = tmp_path / "ref"
    shutil.copytree(ref, copy)
    path = copy / "predictive" / name
    path.write_bytes(damage(path.read_bytes()))
    return copy, path


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("test.npy", lambda b: b[:300]),  # truncated
        ("test.npy", lambda b: b"\x00garbage" + b[8:]),  # the header's magic overwritten
        ("fingerprints.json", lambda b: b[:100]),  # truncated JSON
        ("fingerprints.json", lambda b: b'{"sets": 3}'),  # JSON, but not fingerprints
    ],
)
def test_a_damaged_reference_file_is_named_in_one_line(
    reference_run, tmp_path, name, damage, capfd
):
    ref, _ = reference_run
    copy, path = _damaged_copy(ref, tmp_path, name, damage)
    with pytest.raises(UserError) as err:
        run(compose_cfg(*TINY, f"eval.reference={copy}"), tmp_path / "run")
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "allow_pickle" not in msg
    assert "rerun the reference" in msg


def test_a_damaged_reference_exits_2_through_the_cli(reference_run, tmp_path):
    ref, _ = reference_run
    copy, path = _damaged_copy(ref, tmp_path, "test.npy", lambda b: b[:300])
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "bnn_bench.cli", *TINY, f"eval.reference={copy}",
         f"hydra.run.dir={out}"],
        capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "metrics.json").exists()
