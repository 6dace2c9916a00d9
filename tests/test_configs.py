"""Every config choice composes and validates; the CLI shows the composed config."""

from __future__ import annotations

import dataclasses
import tempfile

import jax
import pytest
from omegaconf import OmegaConf

from bnn_bench.config import build, validate
from bnn_bench.errors import UserError
from bnn_bench.likelihoods import Categorical, Gaussian, task_of
from bnn_bench.models import TRAITS
from tests.conftest import compose_cfg, config_choices

pytestmark = pytest.mark.contract

GROUPS = ["dataset", "model", "likelihood", "method", "trainer", "eval", "logger"]
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


# The refusals that are no model trait: each written once, where the config makes them.
# The SG-MCMC defaults (30 epochs of batch 512, 100 samples) need more than the 1,843
# training examples of dataset=synthetic: 90 steps, 45 after burn-in.
SAMPLERS_SHORT_ON_SYNTHETIC = {"sgld", "psgld", "sghmc"}
SHORT = "exceeds the 45 steps after burn-in"
# KFAC has one Kronecker block per layer; a depthwise convolution has none
DEPTHWISE = r"is a grouped \(depthwise\) convolution"
TEST_SIZE = {"synthetic": 512, "mnist": 10_000, "fashion_mnist": 10_000, "cifar10": 10_000}


def expected_refusal(method: str, needs, model, dataset: str) -> str | None:
    """What a run of ``method`` on ``model`` and ``dataset`` must stop with (a regex), or
    None: the first need the model's traits do not meet (``Method.needs`` ×
    ``models.TRAITS``), else a refusal of the config (above)."""
    for need in needs:
        trait = TRAITS[need.trait]
        if trait.of(model) != need.present:
            side = "with" if need.present else "without"
            return f"method={method} needs a model {side} {trait.noun}"
    if method in SAMPLERS_SHORT_ON_SYNTHETIC and dataset == "synthetic":
        return SHORT
    if method == "laplace_kfac" and TRAITS["depthwise"].of(model):
        return DEPTHWISE
    return None


@pytest.fixture(scope="module")
def shapes():
    """Every dataset (as shapes, from its source: a download counts as reachable) and
    every model built on it, composed once: ``(dataset, model) -> (Dataset, Model, params)``.
    While it is in use, a model's traced forward pass (``module_calls``, which the traits
    read) is traced once per model, not once per method."""
    from bnn_bench.data import sources
    from bnn_bench.data.resolve import resolve
    from bnn_bench.models import base, build_model, num_params

    traced: dict[int, tuple] = {}

    def module_calls(model):
        if id(model) not in traced:  # the model is kept, so its id is not reused
            traced[id(model)] = (model, calls(model))
        return traced[id(model)][1]

    built = {}
    calls = base.module_calls
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tfds:
        mp.setattr(sources, "probe_download", lambda *args: None)
        mp.setattr(base, "module_calls", module_calls)
        mp.setenv("TFDS_DATA_DIR", tfds)
        for dataset in config_choices("dataset"):
            for model in config_choices("model"):
                cfg = compose_cfg(f"dataset={dataset}", f"model={model}", "method=map")
                data = resolve(build(cfg.dataset, "dataset"))
                # the likelihood of the dataset's task (regression datasets: the Gaussian)
                lik = Gaussian() if task_of(data.spec) == "regression" else Categorical()
                module = build(cfg.model, "model", num_classes=lik.outputs(data.spec.num_classes))
                net = build_model(module, data.spec, type(module).__name__.lower(), 128, lik)
                params, _ = jax.eval_shape(net.init, jax.random.key(0))
                built[dataset, model] = (data, net, num_params(params))
        yield built


@pytest.fixture(scope="module")
def method_nodes():
    """Every method's config node, composed once (a method builds from it per case)."""
    return {m: compose_cfg(f"method={m}").method for m in config_choices("method")}


@pytest.mark.parametrize("dataset", config_choices("dataset"))
@pytest.mark.parametrize("model", config_choices("model"))
@pytest.mark.parametrize("method", config_choices("method"))
def test_every_dataset_model_method_combination_plans_or_says_why_not(
    dataset, model, method, shapes, method_nodes
):
    """Every combination, on shapes, as the run and the dry run check it (``Method.check``,
    then ``Method.plan``): it plans the work, or stops with the reason its needs and the
    model's traits give."""
    data, net, params = shapes[dataset, model]
    instance = build(method_nodes[method], "method")
    why = expected_refusal(method, type(instance).needs, net, dataset)
    if why is not None:
        with pytest.raises(UserError, match=why):
            instance.check(net, data)
            instance.plan(net, data)
        return
    instance.check(net, data)
    work = instance.plan(net, data)
    assert work.steps > 0 and work.grad_evals >= work.steps
    assert work.members >= 1 and params > 1000


def test_every_need_names_a_trait_and_the_traits_tell_the_models_apart(shapes, method_nodes):
    """The matrix above tests something: every declared need is on a known trait, and each
    trait is present on some model and absent on another."""
    needs = [n for m in method_nodes.values() for n in type(build(m, "method")).needs]
    assert needs and all(n.trait in TRAITS for n in needs)
    for name, trait in TRAITS.items():
        seen = {trait.of(net) for _, net, _ in shapes.values()}
        if name == "categorical":  # a classification dataset's model with the Gaussian lacks it
            _, net, _ = next(iter(shapes.values()))
            seen.add(trait.of(dataclasses.replace(net, likelihood=Gaussian())))
        assert seen == {True, False}, name


# A full dry run (compose, build, check, plan, evaluation sets, printed plan) of a few
# combinations: one per dataset and model, and one refusal of each kind.
DRY_RUNS = [
    ("synthetic", "mlp", "map"),
    ("mnist", "lenet", "laplace"),
    ("fashion_mnist", "convmod", "mc_dropout"),
    ("cifar10", "mobilenet", "mcbn"),
    ("cifar10", "cnn", "sgld"),
    ("cifar10", "mobilenet", "sghmc"),  # batch norm
    ("synthetic", "mlp", "psgld"),  # too short
    ("mnist", "mobilenet", "laplace_kfac"),  # depthwise
]


@pytest.mark.parametrize("dataset,model,method", DRY_RUNS)
def test_a_dry_run_plans_or_says_why_not(dataset, model, method, shapes, tmp_path, plan_only):
    from bnn_bench.run import run

    cfg = compose_cfg(f"dataset={dataset}", f"model={model}", f"method={method}", "dry_run=true")
    _, net, _ = shapes[dataset, model]
    why = expected_refusal(method, type(build(cfg.method, "method")).needs, net, dataset)
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


@pytest.mark.parametrize(
    ("overrides", "old", "value", "new"),
    [
        (["method=ensemble"], "size", 3, "members"),
        (["method=multi"], "size", 5, "fits"),
        (["method=sgld"], "iterations", 10, "steps"),
        (["method=hmc"], "num_samples", 4, "members_per_chain"),
        (["method=vi"], "chunk_size", 2, "members_per_chunk"),
    ],
)
def test_an_old_key_in_a_yaml_names_its_new_name(overrides, old, value, new):
    """A preset or YAML that still sets an old key (config.RENAMED): one message with the
    new key and the value, not a did-you-mean."""
    cfg = compose_cfg(*overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.method[old] = value
    with pytest.raises(UserError) as e:
        validate(cfg)
    assert str(e.value) == (
        f"method.{old} was renamed to method.{new} (docs/glossary.md); use method.{new}={value}."
    )


def test_an_old_key_nested_or_without_a_value_names_its_new_name():
    cfg = compose_cfg("method=laplace")
    OmegaConf.set_struct(cfg, False)
    cfg.method.predictive.num_samples = None
    with pytest.raises(UserError, match=r"^method\.predictive\.num_samples was renamed to "
                       r"method\.predictive\.members \(docs/glossary\.md\); use "
                       r"method\.predictive\.members instead\.$"):  # fmt: skip
        validate(cfg)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["method=ensemble", "method.size=3"], "method.size was renamed to method.members"),
        (["method=sgld", "method.iterations=10"], "method.iterations was renamed to method.steps"),
        (["method=multi", "method.size=5"], "method.size was renamed to method.fits"),
        (
            ["method=laplace", "method.predictive.num_samples=4"],
            "method.predictive.num_samples was renamed to method.predictive.members",
        ),
    ],
)
def test_an_old_key_on_the_command_line_names_its_new_name(args, line):
    """Hydra refuses an old key at composition; ``overrides.explain`` gives the same one
    line as ``validate``, with the command's value."""
    from bnn_bench.overrides import explain
    from tests.conftest import CONF

    value = args[-1].split("=")[1]
    new = line.rsplit(" ", 1)[1]
    assert explain(args, CONF) == f"{line} (docs/glossary.md); use {new}={value}."


def test_old_keys_in_a_sweep_name_each_choice_s_new_name():
    from bnn_bench.overrides import explain
    from tests.conftest import CONF

    assert explain(["method=ensemble,multi", "method.size=5"], CONF) == (
        "method.size was renamed to method.members (docs/glossary.md); use method.members=5 "
        "(method=ensemble). method.size was renamed to method.fits (docs/glossary.md); use "
        "method.fits=5 (method=multi)."
    )


def test_cli_prints_composed_config(run_cli):
    proc = run_cli("--cfg", "job", "method=map", "dataset=cifar10", "model=mobilenet")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    cfg = OmegaConf.create(out)
    assert cfg.dataset.name == "cifar10"
    assert cfg.model._target_.endswith("MobileNetV1")
    assert cfg.method._target_.endswith("MAP") and "seed" in cfg


def test_cli_help_lists_groups(run_cli):
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "bnn-bench" in out
    for group in GROUPS:
        assert f"{group}:" in out
    # where jobs run and how a sweep picks them, with every choice this checkout has
    lines = dict(ln.split(": ", 1) for ln in out.splitlines() if ln.startswith("hydra/"))
    assert {"basic", "slurm", "submitit_slurm"} <= set(lines["hydra/launcher"].split(", "))
    assert {"basic", "tune"} <= set(lines["hydra/sweeper"].split(", "))
    assert "experiment/" not in out  # a preset's own files are not choices
    assert "method/sampling" not in out  # nor the SG-MCMC YAMLs' shared base


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
