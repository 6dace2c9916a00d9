"""Every config choice composes and validates; the CLI shows the composed config."""

from __future__ import annotations

import subprocess

import pytest
from omegaconf import OmegaConf

from bnn_bench.config import build, validate
from bnn_bench.errors import UserError
from tests.conftest import CLI, cli_env, compose_cfg, config_choices

pytestmark = pytest.mark.contract

GROUPS = ["dataset", "model", "method", "trainer", "eval", "logger"]
# groups composed by a method's YAML (trainer: by the methods that train): the method
# that composes each, and where its node lands
NESTED = {
    "trainer/optimizer": ("method=map", "trainer.optimizer"),
    "trainer/schedule": ("method=map", "trainer.schedule"),
    "method/laplace/structure": ("method=laplace", "method.structure"),
    "method/laplace/curvature": ("method=laplace", "method.curvature"),
    "method/laplace/predictive": ("method=laplace", "method.predictive"),
    "method/laplace/prior_precision": ("method=laplace", "method.prior_precision"),
    "method/swag/covariance": ("method=swag", "method.covariance"),
}
CHOICES = [
    *[(g, c, (), g) for g in GROUPS if g != "trainer" for c in config_choices(g)],
    *[(g, c, (base,), node) for g, (base, node) in NESTED.items() for c in config_choices(g)],
]


@pytest.mark.parametrize("group,choice,base,node", CHOICES)
def test_every_choice_composes_and_validates(group, choice, base, node):
    cfg = compose_cfg(*base, f"{group}={choice}")
    validate(cfg)  # every _target_ exists and takes exactly its YAML's keys
    assert OmegaConf.select(cfg, f"{node}._target_")


# Which pairs cannot run, and why: SG-MCMC and HMC sample parameters, and batch-norm statistics
# are not parameters; MC-BatchNorm has nothing to do without batch norm. Only mobilenet
# has batch norm by default (lenet: model.norm=none).
BATCH_NORM_MODELS = {"mobilenet"}
# The SG-MCMC defaults (30 epochs of batch 512, 100 samples) need more than the 1,843
# training examples of dataset=synthetic: 90 steps, 45 after burn-in.
IMPOSSIBLE = {
    "sgmcmc": "needs a model without batch norm",
    "hmc": "method=hmc needs a model without batch norm",
    "mcbn": "method=mcbn needs a model with batch norm",
    "sgmcmc-synthetic": "method.accepted_samples=100 exceeds the 45 steps after burn-in",
    # dropout_rate defaults to 0 on mlp, cnn and lenet; mobilenet has none
    "mc_dropout": "method=mc_dropout needs a model with dropout",
    "vi": "method=vi needs a model without batch norm",
    "vi-dropout": "method=vi needs a model without dropout",
    # KFAC has one Kronecker block per layer; mobilenet's depthwise convolutions have none
    "kfac-depthwise": r"is a grouped \(depthwise\) convolution",
}
DEPTHWISE_MODELS = {"mobilenet"}
DROPOUT_MODELS = {"convmod"}  # dropout by default (mlp, cnn, lenet: model.dropout_rate=0)
TEST_SIZE = {"synthetic": 512, "mnist": 10_000, "fashion_mnist": 10_000, "cifar10": 10_000}


@pytest.mark.parametrize("dataset", config_choices("dataset"))
@pytest.mark.parametrize("model", config_choices("model"))
@pytest.mark.parametrize("method", config_choices("method"))
def test_every_dataset_model_method_combination_plans_or_says_why_not(
    dataset, model, method, tmp_path, plan_only
):
    """A dry run of every combination: it builds the model on the dataset's input shape
    and the method, and plans the work, or stops with the reason the real run would."""
    from bnn_bench.run import run

    cfg = compose_cfg(f"dataset={dataset}", f"model={model}", f"method={method}", "dry_run=true")
    bn, sgmcmc = model in BATCH_NORM_MODELS, method in ("sgld", "psgld", "sghmc")
    why = (
        IMPOSSIBLE["sgmcmc"] if sgmcmc and bn
        else IMPOSSIBLE["hmc"] if method == "hmc" and bn
        else IMPOSSIBLE["sgmcmc-synthetic"] if sgmcmc and dataset == "synthetic"
        else IMPOSSIBLE["mcbn"] if method == "mcbn" and not bn
        else IMPOSSIBLE["mc_dropout"] if method == "mc_dropout" and model not in DROPOUT_MODELS
        else IMPOSSIBLE["vi"] if method == "vi" and bn
        else IMPOSSIBLE["vi-dropout"] if method == "vi" and model in DROPOUT_MODELS
        else IMPOSSIBLE["kfac-depthwise"] if method == "laplace_kfac" and model in DEPTHWISE_MODELS
        else None
    )  # fmt: skip
    if why is not None:
        with pytest.raises(UserError, match=why):
            run(cfg, tmp_path / "run")
        return
    plan = run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    assert plan["plan/steps"] > 0 and plan["plan/grad_evals"] >= plan["plan/steps"]
    assert plan["plan/members"] >= 1 and plan["plan/params"] > 1000
    assert plan["plan/test_size"] == TEST_SIZE[dataset] and plan["plan/val_size"] > 0


def test_non_data_groups_instantiate():
    cfg = compose_cfg("method=map")
    for group in ("trainer", "eval", "logger"):
        assert build(cfg[group], group) is not None


def test_misspelt_key_in_a_yaml_names_the_key_and_the_accepted_ones():
    cfg = compose_cfg("method=map")
    OmegaConf.set_struct(cfg, False)
    cfg.trainer.epoch = 3
    with pytest.raises(UserError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "trainer.epoch" in msg and "Did you mean 'epochs'" in msg
    assert "batch_size" in msg  # the accepted keys are listed


def test_cli_prints_composed_config():
    out = subprocess.run(
        [*CLI, "--cfg", "job", "method=map", "dataset=cifar10", "model=mobilenet"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
        check=True,
    ).stdout
    cfg = OmegaConf.create(out)
    assert cfg.dataset.name == "cifar10"
    assert cfg.model._target_.endswith("MobileNetV1")
    assert cfg.method._target_.endswith("MAP") and "seed" in cfg


def test_cli_help_lists_groups():
    out = subprocess.run(
        [*CLI, "--help"], capture_output=True, text=True, env=cli_env(), timeout=120, check=True
    ).stdout
    assert "bnn-bench" in out
    for group in GROUPS:
        assert f"{group}:" in out
    # where jobs run and how a sweep picks them, with every choice this checkout has
    lines = dict(ln.split(": ", 1) for ln in out.splitlines() if ln.startswith("hydra/"))
    assert {"basic", "slurm", "submitit_slurm"} <= set(lines["hydra/launcher"].split(", "))
    assert {"basic", "tune"} <= set(lines["hydra/sweeper"].split(", "))
    assert "experiment/" not in out  # a preset's own files are not choices


def test_dry_run_refuses_a_full_laplace_the_run_would_refuse(tmp_path, plan_only):
    """structure=full is limited to 5,000 parameters; the dry run says so before any work
    (experiment=fmnist_small's MLP has 10,360), and plans a network under the limit."""
    from bnn_bench.run import run

    base = ["dataset=synthetic", "model=mlp", "method=laplace", "dry_run=true"]
    full = "method/laplace/structure=full"
    with pytest.raises(UserError, match="limited to 5,000 parameters"):
        run(compose_cfg(*base, full, "model.hidden=[50]"), tmp_path / "run")
    plan = run(compose_cfg(*base, full, "model.hidden=[4]"), tmp_path / "run")
    assert plan["plan/params"] < 5000 and not (tmp_path / "run").exists()
    # last_layer keeps a dense matrix over the last layer only: any network
    plan = run(compose_cfg(*base, "method/laplace/structure=last_layer"), tmp_path / "run")
    assert plan["plan/params"] > 5000
