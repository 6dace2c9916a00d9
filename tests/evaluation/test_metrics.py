"""Metrics on hand-computed cases and against independent references (sklearn, direct
numpy loops); the streamed summary against the dense (S, N, C) computation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from bnn_bench import evaluation
from bnn_bench.evaluation import metrics as M
from bnn_bench.evaluation.summary import PredictiveSummary

pytestmark = pytest.mark.unit


def _summary(probs, chunks=None) -> PredictiveSummary:
    probs = np.asarray(probs, np.float32)
    s = PredictiveSummary.empty(probs.shape[1], probs.shape[2], keep_idx=range(2), capacity=8)
    bounds = np.cumsum([0, *(chunks or [probs.shape[0]])])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        s = s.add(jnp.log(jnp.asarray(probs[a:b])))  # members give log-probabilities
    return s


def _random_probs(rng, s, n, c, sharp=3.0):
    logits = sharp * rng.standard_normal((s, n, c))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


# --- hand-computed cases


def test_perfect_classifier():
    labels = np.array([0, 1, 2, 1, 0])
    probs = np.eye(3)[labels][None]  # (1, N, C), one member, certain and right
    m = evaluation.compute(_summary(probs), labels)
    assert m["acc"] == m["acc_hard"] == 1.0
    assert m["nll"] == pytest.approx(0.0, abs=1e-9)
    for key in (
        "brier",
        "ece",
        "aece",
        "mce",
        "aurc",
        "augrc",
        "risk_at_80cov",
        "entropy",
        "mutual_info",
        "uncertain",
    ):
        assert m[key] == pytest.approx(0.0, abs=1e-6), key
    assert m["cov_at_5risk"] == 1.0 and m["certainty"] == 1.0 and m["members"] == 1.0


def test_uniform_predictions():
    c, labels = 4, np.array([0, 1, 2, 3, 0, 0, 1, 3])
    m = evaluation.compute(_summary(np.full((3, 8, c), 1 / c)), labels)
    assert m["nll"] == pytest.approx(math.log(c), rel=1e-6)
    assert m["entropy"] == pytest.approx(math.log(c), rel=1e-6)
    assert m["expected_entropy"] == pytest.approx(math.log(c), rel=1e-6)
    assert m["mutual_info"] == pytest.approx(0.0, abs=1e-6)
    assert m["brier"] == pytest.approx(1 - 1 / c, rel=1e-6)
    # argmax ties go to class 0: right for the three inputs labelled 0
    assert m["acc"] == pytest.approx(3 / 8) and m["acc_hard"] == pytest.approx(3 / 8)
    assert m["ece"] == pytest.approx(abs(3 / 8 - 1 / c), rel=1e-6)
    assert m["uncertain"] == 1.0


def test_known_miscalibration():
    # Confidence 0.9 everywhere, right on 6 of 10: every calibration error is 0.3.
    labels = np.array([0] * 6 + [1] * 4)
    probs = np.tile([0.9, 0.1], (10, 1))
    assert M.ece(probs, labels) == pytest.approx(0.3)
    assert M.aece(probs, labels, num_bins=1) == pytest.approx(0.3)
    assert M.mce(probs, labels) == pytest.approx(0.3)
    # Equal-mass bins: five at 0.6 (3 right: calibrated), five at 0.9 (2 right: off by 0.5).
    probs = np.array([[0.6, 0.4]] * 5 + [[0.9, 0.1]] * 5)
    labels = np.array([0, 0, 0, 1, 1] + [0, 0, 1, 1, 1])
    assert M.aece(probs, labels, num_bins=2) == pytest.approx(0.5 * 0.0 + 0.5 * 0.5)
    # Two bins, one calibrated and one off by 0.4: ECE weights it, MCE does not.
    probs = np.array([[0.95, 0.05]] * 4 + [[0.6, 0.4]] * 6)
    labels = np.array([0, 0, 0, 0] + [1] * 6)  # 0.95 -> all right; 0.6 -> all wrong
    assert M.ece(probs, labels) == pytest.approx(0.4 * 0.05 + 0.6 * 0.6)
    assert M.mce(probs, labels) == pytest.approx(0.6)


def test_selective_metrics_match_torch_uncertainty_examples():
    # TorchUncertainty's AURC docstring: 0.0833; CovAtxRisk's: 0.8 at 30% risk.
    probs = np.array([[0.7, 0.3], [0.6, 0.4], [0.8, 0.2]])
    labels = np.array([0, 1, 0])
    conf, err = probs.max(-1), probs.argmax(-1) != labels
    assert M.aurc(conf, err) == pytest.approx(1 / 12)
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.5, 0.5], [0.7, 0.3]])
    labels = np.array([0, 1, 0, 1, 0])
    conf, err = probs.max(-1), probs.argmax(-1) != labels
    assert M.coverage_at_risk(conf, err, 0.3) == pytest.approx(0.8)
    assert math.isnan(M.coverage_at_risk(np.array([0.9, 0.8]), np.array([1, 1]), 0.05))


def test_hard_voting_ties_go_to_the_lowest_class():
    # Two members vote class 2, two vote class 1: the tie goes to class 1, always.
    probs = np.array([[[0.1, 0.2, 0.7]], [[0.1, 0.2, 0.7]], [[0.1, 0.6, 0.3]], [[0.1, 0.6, 0.3]]])
    for chunks in ([4], [1, 3], [2, 1, 1]):
        s = _summary(probs, chunks)
        assert int(s.hard_vote()[0]) == 1
        assert float(s.agreement()[0]) == 0.5


def test_accuracy_over_certainty_and_confidence():
    hard = np.array([0, 1, 1, 2])
    certainty = np.array([1.0, 0.5, 0.8, 0.6])
    labels = np.array([0, 0, 1, 2])
    r = M.accuracy_over_certainty(hard, certainty, labels, thresholds=(0.5, 0.7, 1.0))
    np.testing.assert_allclose(r["accuracy"], [3 / 4, 2 / 2, 1 / 1])
    np.testing.assert_allclose(r["share"], [1.0, 0.5, 0.25])
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 0])
    r = M.accuracy_over_confidence(probs, labels, thresholds=(0.0, 0.6, 0.85, 0.95))
    np.testing.assert_allclose(r["kept"], [1.0, 0.75, 0.25, 0.0])
    np.testing.assert_allclose(r["accuracy"][:3], [0.5, 2 / 3, 1.0])
    assert math.isnan(r["accuracy"][3])
    counts = M.uncertain_per_class(
        np.array([[0.4, 0.3, 0.3], [0.9, 0.05, 0.05], [0.45, 0.1, 0.45]]), np.array([2, 2, 0]), 3
    )
    np.testing.assert_array_equal(counts, [1, 0, 1])


# --- random cases against independent computations


@pytest.mark.parametrize("ties", [False, True])
def test_ood_metrics_match_sklearn(ties):
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(0, 1, 300), rng.normal(0.8, 1, 200)
    if ties:  # coarse scores: many ties across the two groups
        s_in, s_out = np.round(s_in), np.round(s_out)
    y = np.r_[np.zeros(300), np.ones(200)]
    s = np.r_[s_in, s_out]
    assert M.auroc(s_in, s_out) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.aupr(s_in, s_out) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert M.fpr_at_tpr(s_in, s_out) == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)


def test_calibration_matches_direct_loops():
    rng = np.random.default_rng(2)
    probs = _random_probs(rng, 1, 500, 5, sharp=2.0)[0]
    labels = rng.integers(0, 5, 500)
    conf, pred = probs.max(-1), probs.argmax(-1)
    ece = mce = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            gap = abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
            ece += sel.mean() * gap
            mce = max(mce, gap)
    assert M.ece(probs, labels) == pytest.approx(ece)
    assert M.mce(probs, labels) == pytest.approx(mce)
    order = np.argsort(conf)
    aece, start = 0.0, 0
    for size in [500 // 15 + 1] * (500 % 15) + [500 // 15] * (15 - 500 % 15):
        idx = order[start : start + size]
        aece += size / 500 * abs((pred[idx] == labels[idx]).mean() - conf[idx].mean())
        start += size
    assert M.aece(probs, labels) == pytest.approx(aece)


def test_selective_metrics_match_direct_computation():
    rng = np.random.default_rng(3)
    conf = rng.uniform(0.2, 1.0, 400)
    errors = (rng.uniform(size=400) > conf).astype(float)  # confident -> more often right
    n = 400
    order = sorted(range(n), key=lambda i: -conf[i])
    risks = [sum(errors[order[j]] for j in range(k)) / k for k in range(1, n + 1)]
    cov = [k / n for k in range(1, n + 1)]
    area = sum((cov[i + 1] - cov[i]) * (risks[i + 1] + risks[i]) / 2 for i in range(n - 1))
    garea = sum(
        (cov[i + 1] - cov[i]) * (risks[i + 1] * cov[i + 1] + risks[i] * cov[i]) / 2
        for i in range(n - 1)
    )
    assert M.aurc(conf, errors) == pytest.approx(area / (1 - 1 / n))
    assert M.augrc(conf, errors) == pytest.approx(garea / (1 - 1 / n))
    assert M.risk_at_coverage(conf, errors, 0.8) == pytest.approx(risks[319])
    ok = [c for c, r in zip(cov, risks, strict=True) if r <= 0.05]
    assert M.coverage_at_risk(conf, errors, 0.05) == pytest.approx(max(ok))
    # a random ranking does worse than this informative one
    assert M.aurc(rng.uniform(size=n), errors) > M.aurc(conf, errors)


def test_streaming_in_chunks_equals_the_dense_computation():
    rng = np.random.default_rng(4)
    s, n, c = 9, 60, 4
    probs = _random_probs(rng, s, n, c).astype(np.float32)
    labels = rng.integers(0, c, n)
    chunked = evaluation.compute(_summary(probs, [2, 3, 1, 3]), labels)
    whole = evaluation.compute(_summary(probs), labels)
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6, nan_ok=True), key

    # dense reference on the (S, N, C) array, written out independently
    p = probs.astype(np.float64)
    mean = p.mean(0)
    h = lambda q: -(q * np.log(np.clip(q, 1e-12, None))).sum(-1)
    votes = np.stack([np.bincount(p[:, i].argmax(-1), minlength=c) for i in range(n)])
    hard = votes.argmax(-1)
    assert chunked["acc"] == pytest.approx((mean.argmax(-1) == labels).mean())
    assert chunked["acc_hard"] == pytest.approx((hard == labels).mean())
    assert chunked["nll"] == pytest.approx(-np.log(mean[np.arange(n), labels]).mean(), rel=1e-5)
    assert chunked["entropy"] == pytest.approx(h(mean).mean(), rel=1e-5)
    assert chunked["expected_entropy"] == pytest.approx(h(p).mean(), rel=1e-5)
    assert chunked["mutual_info"] == pytest.approx((h(mean) - h(p).mean(0)).mean(), rel=1e-4)
    assert chunked["certainty"] == pytest.approx((votes.max(-1) / s).mean())
    assert chunked["ece"] == pytest.approx(M.ece(mean, labels), abs=1e-6)
    s_chunked = _summary(probs, [2, 3, 1, 3])
    np.testing.assert_allclose(s_chunked.variance(), p.var(0), atol=1e-6)
    # the first two inputs keep every member, up to the capacity of 8
    np.testing.assert_allclose(s_chunked.kept_members(), probs[:8, :2], atol=1e-7)


def test_evaluate_names_every_set_and_scores_ood():
    rng = np.random.default_rng(5)
    test = _random_probs(rng, 4, 50, 3, sharp=4.0)
    ood = _random_probs(rng, 4, 40, 3, sharp=0.5)  # flatter: higher entropy
    labels = test.mean(0).argmax(-1)
    summaries = {
        "test": _summary(test),
        "ood": _summary(ood),
        "shift/rotate/30": _summary(test),
        "shift/rotate/90": _summary(ood[:, :30]),
    }
    metrics, curves = evaluation.evaluate(
        summaries,
        {"test": labels, "ood": None, "shift/rotate/30": labels, "shift/rotate/90": labels[:30]},
    )
    assert metrics["test/acc"] == 1.0 and "ood/acc" not in metrics
    assert metrics["ood/entropy"] > metrics["test/entropy"]
    for score in evaluation.OOD_SCORES:
        for m in ("auroc", "aupr", "fpr95"):
            assert 0.0 <= metrics[f"ood/{m}_{score}"] <= 1.0
    assert metrics["ood/auroc_entropy"] > 0.9
    assert set(curves) == {"test", "shift"}
    assert curves["shift"]["rotate"]["level"] == [0.0, 30.0, 90.0]
    assert curves["shift"]["rotate"]["acc"][:2] == [1.0, 1.0]


def test_ood_mutual_information_is_nan_for_one_member():
    rng = np.random.default_rng(6)
    m = evaluation.ood_metrics(
        _summary(_random_probs(rng, 1, 20, 3)), _summary(_random_probs(rng, 1, 20, 3))
    )
    assert math.isnan(m["auroc_mi"]) and not math.isnan(m["auroc_msp"])


def test_nll_is_exact_below_any_clip_against_a_dense_float64_computation():
    # Labels whose probability is 1e-17 .. 1e-87 for some members (and underflows to
    # zero in float32 for one): a clip at 1e-12 would cap each at 27.6 nats.
    logits = np.array(
        [
            [[0.0, 40.0, 0.0], [0.0, 0.0, 200.0], [5.0, 0.0, 0.0], [0.0, 90.0, 1.0]],
            [[1.0, 0.0, 0.0], [0.0, 0.0, 60.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]],
            [[0.0, 80.0, 0.0], [0.0, 0.0, 150.0], [0.0, 0.0, 2.0], [0.0, 120.0, 0.0]],
        ]
    )  # (S=3, N=4, C=3)
    y = np.array([0, 1, 0, 2])
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))  # float64 log-softmax
    at_y = logp[:, np.arange(4), y]  # (S, N)
    top = at_y.max(0)
    dense_mixture = -np.mean(top + np.log(np.exp(at_y - top).mean(0)))
    dense_members = -np.mean(at_y)

    summary = PredictiveSummary.empty(4, 3, labels=y).add(
        jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    )
    out = evaluation.compute(summary, y)
    assert out["nll"] == pytest.approx(dense_mixture, rel=1e-6)
    np.testing.assert_allclose(
        summary.nll(), -(top + np.log(np.exp(at_y - top).mean(0))), rtol=1e-6
    )
    lp32 = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    assert M.nll_of_log_probs(lp32, y) == pytest.approx(dense_members, rel=1e-6)
    assert float(M.nll_of_log_probs(lp32, jnp.asarray(y), xp=jnp)) == pytest.approx(
        dense_members, rel=1e-6
    )
    # the case is one where clipping the probabilities gets it wrong by many nats
    assert dense_mixture - M.nll(np.exp(logp).mean(0), y) > 5
    assert dense_members - M.nll(np.exp(logp), y) > 20
    # the rest of the summary matches the dense probabilities
    np.testing.assert_allclose(summary.mean(), np.exp(logp).mean(0), atol=1e-7)
    assert out["entropy"] == pytest.approx(
        -np.mean(np.sum(xlogy(np.exp(logp).mean(0)), -1)), rel=1e-5, abs=1e-7
    )


def xlogy(p):
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


@pytest.mark.e2e  # compiles a MAP member, the MAP report and two chains (~80 s at load 20)
def test_a_methods_members_and_point_estimates_give_the_exact_nll_of_extreme_logits():
    # A network with weights x40 puts many labels below 1e-12 (down to ~1e-100): the NLL
    # of the posterior predictive (MAP's one member through predict), of the MAP network
    # and of a sampler's last samples must equal a float64 log-softmax of its logits.
    from bnn_bench.config import build
    from bnn_bench.data import SyntheticDataset
    from bnn_bench.evaluation import EvalInputs
    from bnn_bench.methods.point.map import PointPosterior, map_metrics
    from bnn_bench.methods.sampling.base import last_sample_metrics
    from bnn_bench.models import build_model
    from bnn_bench.models.mlp import MLP
    from tests.conftest import compose_cfg

    data = SyntheticDataset(
        shape=(8, 8, 1), num_classes=4, train_size=8, test_size=64, val_fraction=0
    ).load()
    model = build_model(MLP(hidden=(16,), num_classes=4), data.spec)
    nets = [jax.tree.map(lambda a: 40 * a, model.init(jax.random.key(i))[0]) for i in (0, 1)]
    x, y = data.test.x, np.asarray(data.test.y)

    def dense_nll(params):  # (N,) float64 -log softmax(logits)[y]
        z = np.asarray(model.logits(params, {}, x), np.float64)
        m = z.max(-1)
        return m + np.log(np.exp(z - m[:, None]).sum(-1)) - z[np.arange(len(y)), y]

    per_net = [dense_nll(p) for p in nets]
    assert np.mean(per_net[0] > 27.7) > 0.1  # a clip at 1e-12 would cap these

    method = build(compose_cfg("method=map").method, "method")
    inputs = EvalInputs({"test": x}, labels={"test": data.test.y})
    summary = method.predict(jax.random.key(0), PointPosterior(model, nets[0], {}), inputs)["test"]
    assert evaluation.compute(summary, y)["nll"] == pytest.approx(per_net[0].mean(), rel=1e-5)
    report = map_metrics(model, nets[0], {}, {"test": data.test}, 15)
    assert report["map/test/nll"] == pytest.approx(per_net[0].mean(), rel=1e-5)
    chains = jax.tree.map(lambda *a: jnp.stack(a), *nets)
    last = last_sample_metrics(model, chains, data, inputs)
    assert last["test/last_sample_nll"] == pytest.approx(np.mean(per_net), rel=1e-5)
