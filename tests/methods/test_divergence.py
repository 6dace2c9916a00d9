"""A diverged loop is not a result: the one check of the chunked loop (``methods/loop.py``)
stops a run whose parameters went non-finite or whose training loss blew up, with one
line naming the key to change, and no metrics.json."""

from __future__ import annotations

import math
import subprocess

import jax
import jax.numpy as jnp
import pytest

from bnn_bench.errors import UserError
from bnn_bench.methods.base import RunContext
from bnn_bench.methods.loop import LOSS_BOUND, Divergence
from tests.conftest import CLI, TINY, cli_env
from tests.methods.test_contract import _setup

pytestmark = pytest.mark.e2e

# the key of the logged values that the check bounds, per loop (vi: its NLL term only)
CHECKED = ("train/nll", "sampler/train_nll", "swag/loss", "train/loss")
TRAINS = [
    "map",
    "ensemble",
    "vote",
    "mcbn",
    "swag",
    "vi",
    "mc_dropout",
    "temperature",
    "laplace",
    "laplace_kfac",
    "sgld",
    "psgld",
    "sghmc",
]


def _cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *overrides], env=cli_env(), capture_output=True, text=True, timeout=300
    )


def test_a_blown_up_trainer_exits_2_naming_the_learning_rate_key(tmp_path):
    """The issue's reproduction on TINY: Adam at 1e3 ends with finite parameters and a
    loss of ~1e9 nats, which exited 0 with metrics before."""
    out = tmp_path / "run"
    proc = _cli(*TINY, "trainer.schedule.init_value=1e3", f"hydra.run.dir={out}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error) == 1, proc.stderr[-2000:]
    assert "diverged" in error[0] and "the training loss rose to" in error[0]
    assert "trainer.schedule.init_value (now 1e+03)" in error[0]
    assert not (out / "metrics.json").exists()
    assert "trainer.schedule.init_value" in (out / "error.txt").read_text()


@pytest.mark.parametrize(
    "schedule, key",
    [
        ("trainer/schedule=constant trainer.schedule.value=1e3", "schedule.value (now 1e+03)"),
        (
            "trainer/schedule=piecewise trainer.schedule.init_value=1e3",
            "trainer.schedule.init_value (now 1e+03)",
        ),
        ("trainer.schedule=1e3", "constant learning rate trainer.schedule (now 1e+03)"),
    ],
)
def test_the_message_names_the_key_of_the_schedule_in_use(schedule, key):
    data, model, method = _setup("map", *schedule.split())
    with pytest.raises(UserError, match="diverged") as e:
        method.fit(jax.random.key(0), model, data)
    assert key in str(e.value)


def test_a_sampler_whose_loss_blows_up_with_finite_parameters_stops():
    """SGLD at ε = 1e-2 on TINY keeps finite parameters but a loss of ~1e20 nats: the
    parameter check alone let it finish."""
    data, model, method = _setup("sgld", "method.num_chains=1", "method.step_size.step_size=1e-2")
    with pytest.raises(UserError) as e:
        method.fit(jax.random.key(0), model, data)
    message = str(e.value)
    assert "sgld diverged" in message and "the training loss rose to" in message
    assert "Lower method.step_size (now 0.01)" in message


@pytest.mark.parametrize(
    "name", [n if n in ("map", "sgld") else pytest.param(n, marks=pytest.mark.slow) for n in TRAINS]
)
def test_healthy_tiny_runs_stay_below_the_bound(name):
    """Every method that trains or samples with a training loss: its tiny run finishes,
    and each chunk's checked loss was logged, finite and below the bound."""
    data, model, method = _setup(name)
    logged = []
    method.fit(jax.random.key(0), model, data, RunContext(log=lambda v, step: logged.append(v)))
    losses = [next(v[k] for k in CHECKED if k in v) for v in logged if set(CHECKED) & set(v)]
    assert losses, f"{name} logged no loss the check bounds"
    bound = LOSS_BOUND * math.log(data.spec.num_classes)
    assert all(math.isfinite(x) and x < bound for x in losses), (losses, bound)


def test_the_check_bounds_the_loss_and_the_parameters():
    check = Divergence(fix="", params=lambda c: c, num_classes=10, loss=lambda c, v: v["loss"])
    finite = {"w": jnp.ones(3), "count": jnp.int32(3)}
    bound = LOSS_BOUND * math.log(10)
    assert check.check(finite, {"loss": 0.99 * bound}) is None
    assert "rose to" in check.check(finite, {"loss": 1.01 * bound})
    assert "became nan" in check.check(finite, {"loss": float("nan")})
    nan = {"w": jnp.array([1.0, jnp.inf]), "count": jnp.int32(3)}
    assert "parameters became non-finite" in check.check(nan, {"loss": 1.0})
