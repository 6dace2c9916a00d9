"""One contract for every method in conf/method/: fit -> members -> predict -> save -> report.

Each method needs a tiny budget here; a method without one fails the test, so no
method can skip the contract. A second group of tests pins that each loop's jitted
step is traced once per run, however many chunks (of however many lengths) it runs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_bench.config import build
from bnn_bench.data import Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation import EvalInputs
from bnn_bench.evaluation import metrics as M
from bnn_bench.methods.base import Method, RunContext, Work
from bnn_bench.methods.point.map import MAP, load_point
from bnn_bench.methods.posthoc import PostHoc
from bnn_bench.methods.training import Trainer
from bnn_bench.models import Model, build_model
from tests.conftest import compose_cfg, config_choices, tiny

pytestmark = pytest.mark.contract

# Overrides that make each method quick on the TINY synthetic run. SG-MCMC keeps no
# samples here: its members are then replayed, which the contract covers too.
_TINY_SGMCMC = [
    "method.batch_size=64",
    "method.steps=60",
    "method.burn_in=30",
    "method.members_per_chain=4",
    "method.num_chains=2",
    "method.chunk_size=30",
]
TINY_METHOD: dict[str, list[str]] = {
    "map": [],
    "sgld": [*_TINY_SGMCMC, "method.step_size.step_size=1e-3"],
    "psgld": [*_TINY_SGMCMC, "method.step_size.step_size=1e-3"],
    # friction 10, ε = 0.01: a Langevin step ε/α = 1e-3 like sgld's, momentum decay 0.9
    "sghmc": [*_TINY_SGMCMC, "method.step_size.step_size=1e-2", "method.kernel.friction=10"],
    # τ = 0.05 at ε = 0.01: 5 leapfrog steps per transition while the warm-up tunes ε
    "hmc": [
        "method.trajectory_length=0.05",
        "method.step_size=1e-2",
        "method.max_integration_steps=20",
        "method.burn_in=10",
        "method.members_per_chain=4",
        "method.num_chains=2",
        "method.chunk_size=5",
    ],
    "laplace": [
        "method.structure.rank=8",
        "method.curvature_batches=2",
        "method.predictive.members=4",
        "method.members_per_chunk=3",
    ],
    "laplace_kfac": [
        "method.curvature_batches=2",
        "method.predictive.members=4",
        "method.members_per_chunk=3",
    ],
    "ensemble": ["method.members=2"],
    "vote": ["method.members=2"],
    "mcbn": [
        "model=lenet",
        "model.norm=batchnorm",
        "method.members=3",
        "method.mc_batch_size=16",
    ],
    "temperature": [],
    "mc_dropout": ["model.dropout_rate=0.2", "method.members=3", "method.members_per_chunk=2"],
    "swag": [
        "method.sgd.epochs=2",
        "method.sgd.batch_size=64",
        "method.collect_every=4",
        "method.covariance.rank=3",
        "method.covariance.members=3",
    ],
    "vi": ["method.members=3", "method.members_per_chunk=2", "method.kl_warmup_epochs=1"],
    "multi": [
        "method.fits=2",
        "trainer.epochs=4",
        "trainer.batch_size=64",
        "method.base.sgd.epochs=2",
        "method.base.sgd.batch_size=64",
        "method.base.collect_every=4",
        "method.base.covariance.rank=3",
        "method.base.covariance.members=3",
    ],
}


def _setup(name: str, *extra: str, own_model: bool = False):
    """(data, model, method) of the TINY run of ``name``; with ``own_model`` the
    overrides in ``extra`` replace TINY_METHOD's (the method's budget then comes in extra)."""
    if name not in TINY_METHOD:
        pytest.fail(f"method {name!r} has no tiny budget in TINY_METHOD")
    budget = [] if own_model else TINY_METHOD[name]
    own_model = own_model or any(o.startswith("model=") for o in (*budget, *extra))  # not the MLP
    base = [o for o in tiny(name) if not (own_model and o.startswith("model"))]
    cfg = compose_cfg(*base, *budget, *extra)
    data = build(cfg.dataset, "dataset").load()
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(
        module, data.spec, cfg.model._target_.rsplit(".", 1)[-1].lower(), cfg.eval.batch_size
    )
    method = build(cfg.method, "method")
    return data, model, method


@pytest.mark.parametrize("name", config_choices("method"))
def test_method_contract(name, tmp_path):
    _contract(name, *_setup(name), tmp_path)


# The residual networks, narrowed by their own keys (ResNet-8 of width 4, WRN-10-1) on
# 8x8 synthetic images. wrn16_4 is model=wrn's module with other keys.
NEW_MODELS: dict[str, list[str]] = {
    "resnet20_frn": ["model=resnet20_frn", "model.depth=8", "model.width=4"],
    "resnet20": ["model=resnet20", "model.depth=8", "model.width=4"],
    "wrn": ["model=wrn", "model.depth=10", "model.width=1", "model.dropout_rate=0.1"],
}


def _setup_residual(name: str, model_name: str):
    """The TINY run of ``name`` on a narrowed residual network, and the refusal (a regex)
    it must stop with, or None (tests/test_configs.py's ``expected_refusal``)."""
    from tests.test_configs import expected_refusal

    budget = [o for o in TINY_METHOD.get(name, []) if not o.startswith("model")]
    overrides = [*budget, *NEW_MODELS[model_name], "dataset.shape=[8,8,3]"]
    data, model, method = _setup(name, *overrides, own_model=True)
    return data, model, method, expected_refusal(name, type(method).needs, model, "tiny")


@pytest.mark.parametrize("model_name", list(NEW_MODELS))
@pytest.mark.parametrize("name", config_choices("method"))
def test_every_method_plans_or_refuses_each_residual_network_by_name(name, model_name):
    """Every method × every residual network: it checks and plans, or stops before any
    work with the refusal that names the trait (or the layer) it cannot handle."""
    data, model, method, why = _setup_residual(name, model_name)
    if why is not None:
        with pytest.raises(UserError, match=why):
            method.check(model, data)
        return
    method.check(model, data)
    work = method.plan(model, data)
    assert work.steps > 0 and work.members >= 1


# ~10-50 s of CPU per case (a ResNet's programs compile slowly), so not in CI.
@pytest.mark.long
@pytest.mark.parametrize("model_name", list(NEW_MODELS))
@pytest.mark.parametrize("name", config_choices("method"))
def test_method_contract_on_the_residual_networks(name, model_name, tmp_path):
    """The whole contract for every method that does not refuse the network. Accuracy
    is not asserted: the tiny budgets do not train a ResNet (MAP stays near chance);
    the MLP's contract checks that the methods learn."""
    data, model, method, why = _setup_residual(name, model_name)
    if why is not None:
        pytest.skip(f"refused by name (the test above): {why}")
    _contract(name, data, model, method, tmp_path, min_acc=None)


def _contract(
    name: str, data, model: Model, method: Method, tmp_path, min_acc: float | None = 0.3
) -> None:
    """check, plan, fit, members, predict, save, report: what every method must do; the
    members' accuracy above ``min_acc`` (None: not checked)."""
    assert isinstance(method, Method)
    x, y = data.test.x[:40], data.test.y[:40]
    inputs = EvalInputs({"test": x}, keep=3, capacity=4)
    ctx = RunContext(inputs=inputs)

    # check and plan: the dry run's account of the work, typed
    method.check(model, data)
    work = method.plan(model, data)
    assert isinstance(work, Work)

    # fit: a posterior with its model and the numbers it measured, its cost counted
    posterior = method.fit(jax.random.key(0), model, data, ctx)
    assert posterior.model is model
    assert all(np.isfinite(float(v)) for v in posterior.info.values())
    assert ctx.meter.counts["grad_evals"] > 0

    # members: (S, N, C) probabilities, the same for the same key
    k = jax.random.key(1)
    probs = jnp.exp(jnp.concatenate(list(method.member_log_probs(k, posterior, x))))  # (S, N, C)
    assert probs.ndim == 3 and probs.shape[1:] == (40, data.spec.num_classes)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert bool((probs >= 0).all())
    again = jnp.exp(jnp.concatenate(list(method.member_log_probs(k, posterior, x))))
    np.testing.assert_allclose(again, probs, atol=1e-6)
    assert ctx.meter.counts["samples"] == probs.shape[0]  # the method counts its members
    assert work.members == probs.shape[0]  # the plan said so
    if name != "hmc":  # HMC's plan counts leapfrog steps at the initial step size, not the tuned
        assert work.grad_evals == ctx.meter.counts["grad_evals"]

    # predict: one summary per set, folding exactly those members
    summaries = method.predict(k, posterior, inputs)
    assert set(summaries) == {"test"}
    s = summaries["test"]
    assert int(s.count) == probs.shape[0]
    np.testing.assert_allclose(s.mean(), probs.mean(0), atol=1e-5)
    # the members' accuracy is well above chance on the learnable synthetic data
    assert min_acc is None or float((s.mean().argmax(-1) == y).mean()) > min_acc

    # save: a file in the run folder, or None; a MAP-based method saves its MAP
    saved = method.save(tmp_path, posterior)
    assert saved is None or (saved.is_file() and tmp_path in saved.parents)
    # a method on the PostHoc template (or MAP itself) saves its MAP and reports it
    builds_on_map = isinstance(method, PostHoc)
    if builds_on_map or isinstance(method, MAP):
        params, state = load_point(tmp_path, model)
        jax.tree.map(np.testing.assert_array_equal, params, posterior.params)

    # report: finite numbers; a MAP-based method reports its MAP beside its own metrics
    report = method.report(k, posterior, {"test": Split(x, y)}, 15)
    assert all(np.isfinite(v) for v in report.values())
    if builds_on_map:
        map_probs = model.probs(posterior.params, posterior.state, x)
        assert report["map/test/acc"] == pytest.approx(M.accuracy(map_probs, y))
        assert report["map/test/nll"] == pytest.approx(M.nll(map_probs, y), rel=1e-5)
        assert {"map/test/ece", "map/test/brier"} <= set(report)


def test_sgmcmc_members_need_no_switch():
    """Without save_samples the chains are replayed: the same members as kept samples."""
    data, model, kept = _setup("sgld", "method.save_samples=true")
    replayed = dataclasses.replace(kept, save_samples=False)
    x, k = data.test.x[:30], jax.random.key(0)
    a = np.exp(np.concatenate(list(kept.member_log_probs(k, kept.fit(k, model, data), x))))
    b = np.exp(np.concatenate(list(replayed.member_log_probs(k, replayed.fit(k, model, data), x))))
    assert a.shape == (8, 30, data.spec.num_classes)  # 4 samples x 2 chains
    np.testing.assert_allclose(b, a, atol=1e-5)  # float rounding of another program
    assert np.abs(a[0] - a[-1]).max() > 1e-4  # different samples


def test_sgmcmc_folds_every_step_when_every_step_is_a_sample():
    """With a sample at every post-burn-in step the fold runs without a lax.cond: the
    folded summary still equals the kept samples' members."""
    data, model, method = _setup("sgld", "method.save_samples=true", "method.members_per_chain=30")
    x = data.test.x[:30]
    inputs = EvalInputs({"test": x}, keep=2, capacity=60)
    post = method.fit(jax.random.key(0), model, data, RunContext(inputs))
    probs = np.exp(np.concatenate(list(method.member_log_probs(jax.random.key(0), post, x))))
    assert probs.shape[0] == int(post.summaries["test"].count) == 60  # 30 steps x 2 chains
    np.testing.assert_allclose(post.summaries["test"].mean(), probs.mean(0), atol=1e-5)


# ------------------------------------------------------------ one trace per loop


@dataclasses.dataclass(frozen=True)
class _CountingModel(Model):
    """Counts how often the training forward pass is traced (``train=True``)."""

    traces: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def apply(self, params, state, x, train=False, key=None):
        if train:
            self.traces.append(x.shape)
        return super().apply(params, state, x, train=train, key=key)


def _counting(model: Model) -> _CountingModel:
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    return _CountingModel(**fields)


def test_the_trainer_step_is_traced_once_per_run():
    data, model, _ = _setup("map")
    # 448 / 64 = 7 steps per epoch in chunks of 3: lengths 3, 3, 1 in each of 2 epochs
    trainer = Trainer(epochs=2, batch_size=64, chunk_size=3)
    assert trainer.steps_per_epoch(data.train.size) == 7
    one = _counting(model)
    ctx = RunContext()
    trainer.train(jax.random.key(0), one, data, ctx)
    assert len(one.traces) == 1
    assert ctx.meter.counts["grad_evals"] == 14
    several = _counting(model)
    trainer.train_members(jax.random.split(jax.random.key(0), 2), several, data)
    assert len(several.traces) == 1


def test_the_sampler_step_is_traced_once_per_phase():
    data, model, method = _setup("sgld", "method.chunk_size=7")  # chunks 7, 7, 7, 7, 2
    traces = []

    @functools.wraps(method.kernel.step)
    def step(*args):
        traces.append(1)
        return method.kernel.step(*args)

    counted = dataclasses.replace(method, kernel=method.kernel._replace(step=step))
    ctx = RunContext(inputs=EvalInputs({"test": data.test.x[:20]}))
    counted.fit(jax.random.key(0), model, data, ctx)
    assert len(traces) == 2  # the burn-in program and the sampling program, once each
    assert ctx.meter.counts["grad_evals"] == 60 * 2  # 60 steps of 2 chains
