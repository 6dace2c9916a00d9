"""The SGMCMC method: potential, schedules, run control, chains, errors, saved samples."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blackjax.sgmcmc.gradients import grad_estimator
from flax import serialization

from bnn_bench.config import build
from bnn_bench.errors import UserError
from bnn_bench.evaluation import EvalInputs
from bnn_bench.methods.base import RunContext
from bnn_bench.methods.sampling import schedules
from bnn_bench.methods.sampling.kernels import Kernel, SGLDState, make_log_density
from bnn_bench.methods.sampling.sgmcmc import accepted_steps
from bnn_bench.models import build_model
from bnn_bench.run import run
from tests.conftest import CLI, cli_env, compose_cfg, tiny

pytestmark = pytest.mark.e2e

SAMPLER = [
    "method.batch_size=64",
    "method.steps=40",
    "method.burn_in=20",
    "method.members_per_chain=5",
    "method.chunk_size=20",
    "method.step_size.step_size=1e-3",
]


def _setup(*overrides):
    cfg = compose_cfg(*tiny("sgld"), *SAMPLER, *overrides)
    data = build(cfg.dataset, "dataset").load()
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(module, data.spec, "mlp", cfg.eval.batch_size)
    return cfg, data, model, build(cfg.method, "method")


# ------------------------------------------------------------------ potential
def test_log_density_gradient_equals_blackjax_estimator_of_the_tutorial():
    _, data, model, _ = _setup()
    params, _ = model.init(jax.random.key(0))
    x, y = data.train.x[:32], data.train.y[:32]
    n = data.train.size

    def logprior_fn(p):  # the BlackJAX tutorial's N(0, 1) prior and categorical likelihood
        return sum(jnp.sum(jax.scipy.stats.norm.logpdf(a)) for a in jax.tree.leaves(p))

    def loglik_fn(p, batch):
        xi, yi = batch
        return jax.nn.log_softmax(model.apply(p, {}, xi[None])[0][0])[yi]

    theirs = grad_estimator(logprior_fn, loglik_fn, n)(params, (x, y))
    ours = jax.grad(make_log_density(model, n, prior_scale=1.0))(params, x, y)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours, theirs)


# ------------------------------------------------------------------ schedules
def test_polynomial_schedule_hits_first_and_last_step_size():
    sched = schedules.polynomial(1e-3, 1e-5, gamma=0.33)
    vals = np.asarray(sched(jnp.arange(500), 500))
    np.testing.assert_allclose([vals[0], vals[-1]], [1e-3, 1e-5], rtol=1e-4)
    assert np.all(np.diff(vals) < 0)
    a, b = sched.coefficients(500)  # ε_t = a (b + t)^-γ
    np.testing.assert_allclose(vals[123], a * (b + 123) ** -0.33, rtol=1e-5)


def test_polynomial_schedule_default_last_is_first_times_iterations_to_minus_gamma():
    sched = schedules.polynomial(1e-3, None, gamma=0.33)  # the JaxSGMC CIFAR-10 tutorial
    np.testing.assert_allclose(float(sched(39000 - 1, 39000)), 1e-3 * 39000**-0.33, rtol=1e-4)


def test_constant_and_cyclical_schedules():
    np.testing.assert_allclose(schedules.constant(3e-4)(jnp.arange(7), 7), 3e-4)
    cyc = schedules.cyclical(1e-2, num_cycles=4)  # cycles of 25 steps
    vals = np.asarray(cyc(jnp.arange(100), 100))
    np.testing.assert_allclose(vals[[0, 25, 50, 75]], 1e-2, rtol=1e-6)
    np.testing.assert_allclose(vals[12], 1e-2 / 2 * (np.cos(np.pi * 12 / 25) + 1), rtol=1e-5)
    assert vals[24] < 1e-4


def test_cyclical_exploration_stage_is_the_start_of_each_cycle():
    # Zhang et al. (2020): in each cycle of L steps, steps with (t mod L)/L < β explore
    # (no noise, no samples); the rest sample. The step size is the same cosine.
    cyc = schedules.cyclical(1e-2, num_cycles=4, exploration_fraction=0.8)  # L = 25
    t = np.arange(100)
    stage = np.asarray(cyc.sampling_stage(t, 100))
    np.testing.assert_array_equal(stage, (t % 25) >= 20)
    np.testing.assert_allclose(cyc(t, 100), schedules.cyclical(1e-2, num_cycles=4)(t, 100), rtol=0)
    assert np.all(np.asarray(schedules.constant(1e-3).sampling_stage(t, 100)))
    with pytest.raises(UserError, match="exploration_fraction"):
        schedules.cyclical(1e-2, exploration_fraction=1.0)


def test_bad_schedule_is_a_user_error():
    with pytest.raises(UserError, match="last_step_size"):
        schedules.polynomial(1e-5, 1e-3)


# ------------------------------------------------------------------ run control
def test_accepted_steps_are_exactly_as_configured():
    # 20 samples evenly over 100 post-burn-in steps: every 5th, ending on the last step
    np.testing.assert_array_equal(
        accepted_steps(150, 50, members_per_chain=20), 50 + np.arange(4, 100, 5)
    )
    # as many samples as steps: every post-burn-in step (the BlackJAX tutorial)
    np.testing.assert_array_equal(
        accepted_steps(3340, 2340, members_per_chain=1000), np.arange(2340, 3340)
    )
    np.testing.assert_array_equal(accepted_steps(30, 10, thinning=7), [16, 23])
    idx = accepted_steps(1000, 0, members_per_chain=3)
    np.testing.assert_array_equal(idx, [332, 665, 999])
    with pytest.raises(UserError, match="members_per_chain"):
        accepted_steps(30, 10, members_per_chain=21)


def test_accepted_steps_skip_the_exploration_stage():
    stage = (np.arange(100) % 25) >= 20  # four cycles, the last 5 steps of each sample
    # thinning 1: every sampling-stage step after burn-in (burn-in 30 skips cycle 1's)
    idx = accepted_steps(100, 30, thinning=1, sampling_stage=stage)
    np.testing.assert_array_equal(idx, [45, 46, 47, 48, 49, 70, 71, 72, 73, 74, 95, 96, 97, 98, 99])
    # 3 samples evenly over those 15 steps, the last one included
    idx = accepted_steps(100, 30, members_per_chain=3, sampling_stage=stage)
    np.testing.assert_array_equal(idx, [49, 74, 99])
    with pytest.raises(
        UserError, match=r"members_per_chain=16 exceeds the 70 steps after burn-in \(15 of"
    ):
        accepted_steps(100, 30, members_per_chain=16, sampling_stage=stage)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["method.thinning=21", "method.members_per_chain=null"], "method.thinning=21"),
        (
            [
                "method.step_size._target_=bnn_bench.methods.sampling.schedules.cyclical",
                "+method.step_size.num_cycles=2",
                "+method.step_size.exploration_fraction=0.99",
            ],
            "exploration_fraction",
        ),
    ],
)
def test_a_budget_that_keeps_no_sample_is_refused_before_work(tmp_path, overrides, match):
    # 40 steps, burn-in 20: thinning 21 would keep nothing, and so would cycles whose
    # sampling stage (the last 1% of 20 steps) has no whole step after burn-in
    cfg = compose_cfg(*tiny("sgld"), *SAMPLER, *overrides)
    with pytest.raises(UserError, match=match) as err:
        run(cfg, tmp_path)
    assert "no sample" in str(err.value)
    assert not (tmp_path / "metrics.json").exists()


def test_burn_in_zero_runs(tmp_path):
    metrics, _ = _run(tmp_path, "b0", "method.burn_in=0", "method.burn_in_epochs=null")
    assert metrics["test/members"] == 5


def test_budget_in_epochs():
    cfg, data, _, _ = _setup()
    method = build(
        compose_cfg(
            *tiny("sgld"),
            "method.batch_size=64",
            "method.epochs=4",
            "method.burn_in_epochs=1.5",
            "method.members_per_chain=3",
        ).method,
        "method",
    )
    per_epoch = data.train.size // 64
    total, burn, idx = method.budget(data.train.size)
    assert (total, burn) == (4 * per_epoch, round(1.5 * per_epoch))
    assert len(idx) == 3 and idx[-1] == total - 1


def test_exactly_one_of_members_per_chain_and_thinning():
    cfg = compose_cfg(*tiny("sgld"), "method.thinning=3")
    with pytest.raises(UserError, match="exactly one"):
        build(cfg.method, "method")


def test_cyclical_exploration_stage_runs_without_noise_and_keeps_no_sample():
    # A probe kernel whose step adds the temperature it is given to every parameter:
    # consecutive kept samples then differ by the sum of the temperatures in between.
    def step(key, state, grad_fn, step_size, temperature):
        del key, grad_fn, step_size
        return SGLDState(jax.tree.map(lambda p: p + temperature, state.params))

    _, data, model, method = _setup(
        "method.steps=40",
        "method.burn_in=0",
        "method.members_per_chain=null",
        "method.thinning=1",
        "method.temperature=0.5",
        "method.save_samples=true",
        "method.step_size._target_=bnn_bench.methods.sampling.schedules.cyclical",
        "+method.step_size.num_cycles=4",
        "+method.step_size.exploration_fraction=0.7",
    )
    method = dataclasses.replace(method, kernel=Kernel(SGLDState, step))
    post = method.fit(
        jax.random.key(0), model, data, RunContext(EvalInputs({"test": data.test.x[:8]}))
    )
    leaf = np.asarray(jax.tree.leaves(post.samples)[0]).reshape(12, -1)[:, 0]
    # cycles of 10 steps, steps 7, 8, 9 of each sample: 12 samples, and across the 7
    # exploration steps between two cycles only the first sampling step adds T
    np.testing.assert_allclose(np.diff(leaf), 0.5, rtol=1e-4)


def test_chunking_does_not_change_the_samples():
    _, data, model, m1 = _setup("method.chunk_size=20")
    _, _, _, m2 = _setup("method.chunk_size=7")
    inputs = EvalInputs({"test": data.test.x[:50]}, keep=2, capacity=8)
    s1 = m1.fit(jax.random.key(3), model, data, RunContext(inputs)).summaries["test"]
    s2 = m2.fit(jax.random.key(3), model, data, RunContext(inputs)).summaries["test"]
    np.testing.assert_allclose(s1.prob_sum, s2.prob_sum, rtol=1e-6)


# ------------------------------------------------------------------ end to end
def _run(tmp_path, name, *overrides):
    cfg = compose_cfg(*tiny("sgld"), *SAMPLER, *overrides)
    metrics = run(cfg, tmp_path / name)
    return metrics, json.loads((tmp_path / name / "metrics.json").read_text())


def test_chains_multiply_members_and_same_seed_gives_same_metrics(tmp_path):
    one, _ = _run(tmp_path, "one", "method.num_chains=1")
    two, _ = _run(tmp_path, "two", "method.num_chains=2", "method.save_samples=true")
    again, _ = _run(tmp_path, "again", "method.num_chains=2")
    assert one["test/members"] == 5 and two["test/members"] == 10
    for key in (
        "test/acc",
        "test/nll",
        "test/ece",
        "test/brier",
        "test/members",
        "test/last_sample_acc",
        "val/acc",
        "val/nll",
    ):
        assert two[key] == again[key], key
    assert two["test/acc"] > 0.5  # learnable synthetic data
    # save_samples=true left the 10 samples in the run folder
    samples = serialization.msgpack_restore((tmp_path / "two" / "samples.msgpack").read_bytes())
    assert {leaf.shape[0] for leaf in jax.tree.leaves(samples)} == {10}
    assert not (tmp_path / "one" / "samples.msgpack").exists()


def test_batch_norm_model_is_refused(tmp_path):
    base = [o for o in tiny("sgld") if not o.startswith("model")]
    cfg = compose_cfg(*base, *SAMPLER, "model=lenet", "model.norm=batchnorm")
    with pytest.raises(UserError, match="batch norm"):
        run(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_huge_step_size_stops_with_a_clear_error_and_no_metrics(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            *CLI,
            *tiny("sgld"),
            *SAMPLER,
            "method.step_size.step_size=1e3",
            f"hydra.run.dir={out}",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sgld diverged between steps" in proc.stderr
    assert "Lower method.step_size (now 1e+03)" in proc.stderr
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "preset", ["blackjax_mnist_sgld", "blackjax_mnist_sghmc", "jaxsgmc_cifar10_psgld"]
)
def test_presets_compose_validate_and_build(preset):
    from bnn_bench.config import validate

    cfg = compose_cfg(f"experiment={preset}")
    validate(cfg)
    method = build(cfg.method, "method")
    if preset == "jaxsgmc_cifar10_psgld":
        # 200 epochs of 195 steps, burn-in 180 epochs, 20 samples evenly over the last 20
        total, burn, idx = method.budget(50000)
        assert (total, burn, len(idx)) == (39000, 35100, 20)
        assert list(cfg.dataset.resize) == [112, 112] and cfg.model.use_bn is False
        np.testing.assert_allclose(
            float(method.step_size(total - 1, total)), 1e-3 * 39000**-0.33, rtol=1e-4
        )
    else:
        total, burn, idx = method.budget(60000)
        assert (total, burn, len(idx)) == (3340, 2340, 1000)
