"""Experiment presets: each composes, pins its source's recipe, and gives its MAP baseline
with one override (``experiment=<preset> method=map``)."""

from __future__ import annotations

import pytest
from omegaconf import DictConfig, OmegaConf

from bnn_bench.config import build, reads_trainer, validate, without_unread_trainer
from bnn_bench.errors import UserError
from bnn_bench.methods.laplace import Lanczos, Linearised
from bnn_bench.methods.point.map import MAP
from bnn_bench.run import run
from tests.conftest import CONF, TINY, compose_cfg, config_choices

pytestmark = pytest.mark.contract

PRESETS = config_choices("experiment")
# A preset's settings for one method (conf/experiment/<preset>/<method>.yaml): (preset, method)
PRESET_METHODS = sorted(
    (p.parent.name, p.stem) for p in CONF.glob("experiment/*/*.yaml") if p.parent.name in PRESETS
)

# The training recipe of each preset that trains, as its source gives it (the preset
# YAMLs' opening comments name the sources): composed value of each trainer key.
PRESET_TRAINERS = {
    "laplax_mnist": {
        "optimizer._target_": "optax.adamw",
        "optimizer.b1": 0.9,
        "optimizer.weight_decay": 1e-4,
        "schedule._target_": "optax.constant_schedule",
        "schedule.value": 3e-4,
        "l2": 0.0,
        "steps": 2200,
        "batch_size": 32,
    },
    "tu_mnist_mcbn": {
        "optimizer._target_": "optax.sgd",
        "optimizer.momentum": 0.9,
        "optimizer.nesterov": False,
        "schedule._target_": "optax.piecewise_constant_schedule",
        "schedule.init_value": 0.05,
        "l2": 5e-4,
        "epochs": 2,
        "batch_size": 128,
    },
    "tu_mc_dropout": {
        "optimizer._target_": "optax.sgd",
        "optimizer.momentum": 0.9,
        "optimizer.nesterov": False,
        "schedule._target_": "optax.piecewise_constant_schedule",
        "schedule.init_value": 0.05,
        "l2": 5e-4,
        "epochs": 2,
        "batch_size": 128,
    },
    "resnet20_fmnist": {
        "optimizer._target_": "optax.sgd",
        "optimizer.momentum": 0.9,
        "optimizer.nesterov": False,
        "schedule._target_": "optax.cosine_decay_schedule",
        "schedule.init_value": 0.05,
        "schedule.alpha": 0.0,
        "l2": 5e-4,
        "epochs": 30,
        "batch_size": 128,
    },
    "ub_cifar10_wrn": {
        "optimizer._target_": "optax.sgd",
        "optimizer.momentum": 0.9,
        "optimizer.nesterov": True,
        "schedule._target_": "optax.join_schedules",
        "schedule.boundaries": [97],
        "l2": 4e-4,
        "epochs": 200,
        "batch_size": 512,
    },
    "capsa_mnist_vote": {
        "optimizer._target_": "optax.adam",
        "schedule._target_": "optax.constant_schedule",
        "schedule.value": 1e-3,
        "l2": 0.0,
        "epochs": 5,
        "batch_size": 128,
    },
}


# Presets whose recipe IS a point estimate (a paper's deterministic baseline, an acceptance run)
MAP_PRESETS = {"resnet20_fmnist", "ub_cifar10_wrn"}


@pytest.mark.parametrize("experiment", PRESETS)
def test_every_preset_composes_and_builds_its_method(experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    validate(cfg)
    method = build(cfg.method, "method")
    # every other preset reproduces a non-MAP method
    assert (type(method).__name__ == "MAP") == (experiment in MAP_PRESETS)


@pytest.mark.parametrize("experiment", PRESETS)
def test_every_preset_gives_its_map_baseline(experiment):
    """The preset's data, model and (for presets that train) trainer, with method=map; the
    preset's settings for its own method are not carried over."""
    preset = compose_cfg(f"experiment={experiment}")
    cfg = compose_cfg(f"experiment={experiment}", "method=map")
    validate(cfg)
    assert isinstance(build(cfg.method, "method"), MAP)
    assert cfg.dataset == preset.dataset and cfg.model == preset.model
    if "trainer" in preset:
        assert cfg.trainer == preset.trainer  # the same recipe trains the baseline


@pytest.mark.parametrize("experiment,method", PRESET_METHODS)
def test_every_preset_method_file_composes_onto_its_method(experiment, method):
    """conf/experiment/<preset>/<method>.yaml lands on the method node when that method
    runs: its every key is in the composed method, which validates and builds."""
    cfg = compose_cfg(f"experiment={experiment}", f"method={method}")
    validate(cfg)
    build(cfg.method, "method")
    own = OmegaConf.load(CONF / "experiment" / experiment / f"{method}.yaml")
    for key in ("batch_size", "steps", "burn_in", "members_per_chain"):
        if key in own:
            assert cfg.method[key] == own[key], key


# experiment=fmnist_small's budgets: (method, steps, members) as the dry run plans them
FMNIST_SMALL_PLANS = {
    "hmc": None,  # full-batch HMC: steps are transitions; test_configs plans it
    "sgld": (150_000, 400),
    "psgld": (150_000, 400),
    "sghmc": (150_000, 400),
}


@pytest.mark.parametrize("method", sorted(m for m, p in FMNIST_SMALL_PLANS.items() if p))
def test_fmnist_small_sampler_budgets_dry_run(method, tmp_path, plan_only):
    """`experiment=fmnist_small method=<sampler> dry_run=true` plans the preset's budget
    (not the method's 90 steps of batch 512), at the method's own temperature and at T = 1."""
    steps, members = FMNIST_SMALL_PLANS[method]
    for extra in ((), ("method.temperature=1",)):
        cfg = compose_cfg("experiment=fmnist_small", f"method={method}", "dry_run=true", *extra)
        plan = run(cfg, tmp_path / "run")
        assert not (tmp_path / "run").exists()
        assert (plan["plan/steps"], plan["plan/members"]) == (steps, members)
        assert plan["plan/grad_evals"] == steps and plan["plan/params"] == 10_360
        assert plan["plan/test_size"] == 10_000 and plan["plan/val_size"] == 200
    own = compose_cfg(f"method={method}").method.temperature
    assert compose_cfg("experiment=fmnist_small", f"method={method}").method.temperature == own


def test_fmnist_small_has_a_budget_for_every_sampler():
    """Each method that needs its own budget on 1,800 images has one."""
    assert {m for p, m in PRESET_METHODS if p == "fmnist_small"} == set(FMNIST_SMALL_PLANS)


@pytest.mark.parametrize("experiment", sorted(PRESET_TRAINERS))
def test_training_presets_pin_their_recipe(experiment):
    """A preset states every key of its recipe, so changing the trainer default (as the
    move to cosine, 20 epochs did) cannot change a tutorial's reproduction."""
    cfg = compose_cfg(f"experiment={experiment}")
    preset = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    for key, value in PRESET_TRAINERS[experiment].items():
        got = OmegaConf.select(cfg.trainer, key)
        assert got == (pytest.approx(value) if isinstance(value, float) else value), key
        if key.endswith("_target_"):  # the targets come from the groups it overrides
            continue
        group, _, leaf = key.rpartition(".")
        if group in ("optimizer", "schedule"):  # its settings of its choice of that group
            overrides = {k: v for d in preset.defaults for k, v in d.items()}
            choice = overrides[f"override /trainer/{group}"]
            own = CONF / "experiment" / experiment / "trainer" / group / f"{choice}.yaml"
            assert OmegaConf.select(OmegaConf.load(own), leaf) is not None, key
        else:
            assert OmegaConf.select(preset.trainer, key) is not None, key


def test_izmailov_preset_is_the_papers_setting():
    """Table 3 of Izmailov et al. 2021 for CIFAR-10: prior variance 1/5, SGLD ε 1e-6, batch 80,
    10,000 epochs with 1,000 of burn-in, 5 chains of 900; 50 ensemble members; the vendored HMC
    predictive as the reference, on TFDS's order of the full test set, no augmentation."""
    cfg = compose_cfg("experiment=izmailov_cifar10")
    sgld = build(cfg.method, "method")
    assert sgld.prior_scale**2 == pytest.approx(0.2) and sgld.temperature == 1.0
    assert float(sgld.step_size(0, 1)) == pytest.approx(1e-6)
    total, burn, idx = sgld.budget(50_000)  # 625 steps per epoch of batch 80
    assert (total, burn, len(idx), sgld.num_chains) == (6_250_000, 625_000, 900, 5)
    assert cfg.dataset.val_fraction == 0.0 and cfg.dataset.augment is False
    assert cfg.dataset.source == "tfds" and cfg.model._target_.endswith("ResNetFRN")
    assert cfg.eval.reference.endswith("bnn_bench/references/cifar10_hmc_test.npz")
    assert (cfg.eval.reference_dataset, cfg.eval.reference_split) == ("cifar10", "test")
    assert compose_cfg("experiment=izmailov_cifar10", "method=ensemble").method.members == 50
    # the paper's SGD (bnn_hmc's summed loss -> mean: rate 3e-7 x 50,000, l2 10 / 50,000),
    # with no trainer/optimizer=sgd on the command line: the preset chooses it
    sgd = compose_cfg("experiment=izmailov_cifar10", "method=map")
    validate(sgd)
    trainer = build(sgd.method, "method").trainer
    assert sgd.trainer.optimizer._target_ == "optax.sgd" and sgd.trainer.optimizer.momentum == 0.9
    assert not sgd.trainer.optimizer.nesterov
    assert (trainer.l2, trainer.epochs, trainer.batch_size) == (pytest.approx(2e-4), 500, 80)
    steps = trainer.num_steps(50_000)
    lr = trainer.learning_rate_fn(steps)
    assert float(lr(0)) == pytest.approx(3e-7 * 50_000) and float(lr(steps)) == 0.0


@pytest.mark.parametrize("method", ["map", "ensemble", "sgld", "swag", "laplace_kfac"])
def test_izmailov_sweep_of_the_issue_passes_every_check_of_its_dry_run(method, tmp_path, plan_only):
    """`-m method=map,ensemble,sgld,swag,laplace_kfac experiment=izmailov_cifar10`: each job
    passes the checks a run makes before it reads the data (on CIFAR-10 files in the real
    format), the public reference included. laplace_kfac was refused (whole-network KFAC has
    no block for FRN's parameters, and val_nll has no validation split); the preset's
    laplace_kfac file makes it last-layer KFAC at the MAP's own prior precision, 10."""
    from tests.data.test_sources import make_cifar_batches

    make_cifar_batches(tmp_path / "cifar" / "cifar-10-batches-py")
    cfg = compose_cfg(
        "experiment=izmailov_cifar10",
        f"method={method}",
        "dataset.source=local",
        f"dataset.data_dir={tmp_path / 'cifar'}",
        "dry_run=true",
    )
    plan = run(cfg, tmp_path / "run")
    assert plan["plan/params"] == 274_042 and plan["plan/test_size"] == 10_000
    if method == "laplace_kfac":
        laplace = build(cfg.method, "method")
        assert laplace.structure.subset == "last_layer"
        assert laplace.prior_precision.value == pytest.approx(10.0)
        fmnist = compose_cfg("experiment=resnet20_fmnist", "method=laplace_kfac")
        assert build(fmnist.method, "method").structure.subset == "last_layer"


def test_ub_preset_schedule_is_uncertainty_baselines_warmup_piecewise():
    """The joined optax schedule equals uncertainty-baselines' WarmUpPiecewiseConstantSchedule
    (re-implemented here from its code) at every step of the 200 epochs of 97 steps."""
    cfg = compose_cfg("experiment=ub_cifar10_wrn")
    trainer = build(cfg.method, "method").trainer
    steps = trainer.num_steps(50_000)
    assert steps == 200 * 97
    lr = trainer.learning_rate_fn(steps)

    def ub(step, per_epoch=97, base=0.1 * 512 / 128, ratio=0.2, decay=(60, 120, 160), warmup=1):
        epoch = step / per_epoch
        rate = base * epoch / warmup
        for i, start in enumerate((warmup, *decay)):
            rate = base * ratio**i if epoch >= start else rate
        return rate

    for step in [0, 1, 48, 96, 97, 98, 5819, 5820, 11639, 11640, 15519, 15520, steps - 1]:
        assert float(lr(step)) == pytest.approx(ub(step), rel=1e-5, abs=1e-9), step
    assert cfg.dataset.augment is True and cfg.dataset.val_fraction == 0.0
    assert (cfg.model.depth, cfg.model.width) == (28, 10)


def test_laplax_preset_is_the_tutorials_laplace():
    """GGN, Lanczos rank 100 over 4 batches of 32, τ = 1e4, 30 linearised samples."""
    method = build(compose_cfg("experiment=laplax_mnist").method, "method")
    assert method.structure == Lanczos(rank=100)
    assert type(method.curvature).__name__ == "GGN"
    assert method.predictive == Linearised(members=30)
    assert method.prior_precision.value == 1e4
    assert (method.curvature_batches, method.curvature_batch_size) == (4, 32)


@pytest.mark.e2e
def test_preset_map_baseline_runs(tmp_path):
    """`experiment=laplax_mnist method=map` trains (tiny synthetic data, a few steps)."""
    data = [o for o in TINY if o.startswith("dataset")]
    cfg = compose_cfg(
        "experiment=laplax_mnist", "method=map", *data, "trainer.steps=4", "eval.plots=false"
    )
    metrics = run(cfg, tmp_path)
    assert metrics["cost/grad_evals"] == 4  # trainer.steps, not the preset's 2200


def test_cli_refuses_trainer_keys_for_a_sampler_and_names_its_own(run_cli):
    """The default method samples: trainer.epochs=1 is refused before any work, naming
    the methods that read the trainer group and method.epochs; in a sweep only the job of
    the method that does not train is refused; with a method that trains the key works."""
    proc = run_cli("trainer.epochs=1")
    assert proc.returncode == 2
    assert "trainer.epochs: method=sgld does not train a network" in proc.stderr
    assert "method=ensemble|laplace|laplace_kfac|map|" in proc.stderr
    assert "Did you mean method.epochs=1?" in proc.stderr
    swept = run_cli("-m", "dry_run=true", "method=map,psgld", "trainer.steps=3")
    assert swept.returncode != 0
    assert "2 job(s) checked, 1 would fail" in swept.stdout + swept.stderr
    assert "method=psgld does not train a network" in swept.stderr
    assert "Did you mean method.steps=3?" in swept.stderr
    ok = run_cli("--cfg", "job", "method=map", "trainer.epochs=1")
    assert ok.returncode == 0, ok.stderr
    assert OmegaConf.create(ok.stdout).trainer.epochs == 1


def test_a_sampler_run_drops_the_trainer_node_and_refuses_other_unread_nodes():
    """Every run composes the trainer group; a method that does not read it drops it (a
    trainer key on its command line is refused: the test above). Any other node that no
    part of the config reads is refused."""
    cfg = compose_cfg()  # the default method, sgld
    assert "trainer" in cfg and not reads_trainer(cfg)
    assert "trainer" not in without_unread_trainer(cfg)
    assert "trainer" in without_unread_trainer(compose_cfg("method=map"))
    validate(without_unread_trainer(cfg))
    with pytest.raises(UserError, match="would ignore the sampler"):
        validate(compose_cfg("+sampler.epochs=1"))


@pytest.mark.parametrize("experiment", PRESETS)
@pytest.mark.parametrize("method", ["map", "sgld"])
def test_every_preset_composes_with_a_method_that_trains_and_one_that_samples(experiment, method):
    """A preset may choose the trainer's optimizer and schedule (``override
    /trainer/optimizer: sgd``) and still compose with a sampler, which drops the trainer:
    one sweep runs both (``-m method=map,sgld experiment=izmailov_cifar10``)."""
    cfg = without_unread_trainer(compose_cfg(f"experiment={experiment}", f"method={method}"))
    validate(cfg)
    assert ("trainer" in cfg) == (method == "map")


# --- a user's override wins over a preset ------------------------------------------------


def _choices_of(*overrides: str) -> dict[str, str]:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", list(overrides), return_hydra_config=True)
    return {g: c for g, c in cfg.hydra.runtime.choices.items() if c is not None}


def _option(group: str, choice: str) -> tuple[str, DictConfig]:
    """Where conf/<group>/<choice>.yaml lands (its `# @package`, else the group's path),
    and its own keys."""
    path = CONF / group / f"{choice}.yaml"
    head = path.read_text().splitlines()[0]
    package = head.split()[2] if head.startswith("# @package") else group.replace("/", ".")
    own = OmegaConf.load(path)
    return package, OmegaConf.masked_copy(own, [k for k in own if k != "defaults"])


def _check_preset(*args: str) -> None:
    """``presets.check`` as the job runs it, on the config ``args`` compose."""
    from hydra import compose, initialize_config_dir

    from bnn_bench import presets

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", list(args), return_hydra_config=True)
        choices = cfg.hydra.runtime.choices
        presets.check(cfg, choices, list(args), lambda o: compose("config", o), CONF)


def _preset_methods(experiment: str) -> list[str]:
    own = _choices_of(f"experiment={experiment}")["method"]
    return sorted({own, *(m for p, m in PRESET_METHODS if p == experiment)})


@pytest.mark.e2e  # ~1 min: every preset x method x group x choice composed
@pytest.mark.parametrize("experiment", PRESETS)
def test_a_group_chosen_on_the_command_line_wins_over_the_preset_or_is_refused(experiment):
    """For every method of the preset, every group the method composes (trainer/*,
    method/*), and the dataset and model groups, every choice other than the preset's:
    `experiment=<preset> method=<method> <group>=<choice>` either composes the choice (its
    _target_, no key of it replaced, no key it does not take) or the command refuses it,
    naming the preset; a fix it suggests composes."""
    checked = refused = 0
    done = set()  # (group, choice) of the groups every method shares: checked once
    for method in _preset_methods(experiment):
        base = [f"experiment={experiment}", f"method={method}"]
        choices = _choices_of(*base)
        groups = [g for g in choices if g.startswith(("trainer", "method/"))]
        for group in [*groups, "dataset", "model"]:
            for choice in config_choices(group):
                if choice == choices[group] or (group, choice) in done:
                    continue  # the preset's own choice, or a shared group checked already
                if not group.startswith("method/"):
                    done.add((group, choice))
                args = [*base, f"{group}={choice}"]
                package, own = _option(group, choice)
                if "_target_" not in own:  # a choice made of defaults (method/base/*): as composed
                    own = OmegaConf.select(compose_cfg(f"method={method}", args[-1]), package)
                checked += 1
                try:
                    _check_preset(*args)
                except UserError as e:
                    refused += 1
                    msg = str(e)
                    assert f"{group}={choice}: experiment={experiment} sets" in msg, msg
                    if "give the node whole: '" in msg:
                        fix = msg.split("give the node whole: '")[1].rsplit("'", 1)[0]
                        node = OmegaConf.select(compose_cfg(*base, fix), package)
                        assert node._target_ == own._target_, (fix, node)
                    continue
                cfg = compose_cfg(*args)
                node = OmegaConf.select(cfg, package)
                assert isinstance(node, DictConfig), (args, node)
                assert node.get("_target_") == own.get("_target_"), (args, node)
                if "defaults" not in OmegaConf.load(CONF / group / f"{choice}.yaml"):
                    assert set(node) <= set(own), (args, set(node) - set(own))
    assert checked > refused
    print(f"{experiment}: {checked} choices, {refused} refused with the preset named")


def test_the_issues_prior_precision_override_is_refused_with_a_fix_that_composes():
    """`experiment=laplax_mnist dataset=fashion_mnist method/laplace/prior_precision=marglik`
    composed the preset's fixed τ 1e4 in silence."""
    base = ["experiment=laplax_mnist", "dataset=fashion_mnist"]
    with pytest.raises(UserError) as e:
        _check_preset(*base, "method/laplace/prior_precision=marglik")
    msg = str(e.value)
    assert "sets method.prior_precision=10000.0" in msg, msg
    fix = msg.split("give the node whole: '")[1].rsplit("'", 1)[0]
    assert compose_cfg(*base, fix).method.prior_precision._target_.endswith("MargLik")
    # a choice the preset has no setting for is applied as chosen
    _check_preset(*base, "trainer/optimizer=sgd")
    assert compose_cfg(*base, "trainer/optimizer=sgd").trainer.optimizer == OmegaConf.load(
        CONF / "trainer/optimizer/sgd.yaml"
    )


@pytest.mark.e2e
def test_smoke_preset_runs_every_method_in_one_sweep(tmp_path, run_cli):
    """`bnn-bench -m experiment=smoke method=<every method>`: every job finishes (its
    metrics.json), none fails, and the sweep exits 0."""
    import time

    methods = config_choices("method")
    sweep = tmp_path / "sweep"
    tic = time.monotonic()
    # in this process, as Hydra's basic launcher runs a sweep's jobs in its own
    proc = run_cli(
        "-m", "experiment=smoke", f"method={','.join(methods)}", f"hydra.sweep.dir={sweep}"
    )
    took = time.monotonic() - tic
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished = {
        OmegaConf.load(p.parent / ".hydra" / "overrides.yaml")[-1]
        for p in sweep.rglob("metrics.json")
    }
    assert finished == {f"method={m}" for m in methods}
    assert not list(sweep.rglob("error.txt"))
    print(
        f"experiment=smoke, {len(methods)} methods: {took:.0f} s, {took / len(methods):.1f} s/job"
    )


# --- regression presets (issue 20) -------------------------------------------------------


def test_uci_preset_is_the_papers_protocol():
    """experiment=uci: diabetes, one hidden layer of 50, the Gaussian likelihood with learned
    noise, deep ensembles' trainer (Adam at a fixed rate, batch 100, 40 epochs) for the
    methods that train; MC dropout with DropoutUncertaintyExps' (Adam 1e-3, batch 128, p
    0.05); deep ensembles' 5 heteroscedastic networks; HMC without a trainer."""
    cfg = compose_cfg("experiment=uci", "method=map")
    validate(cfg)
    assert cfg.dataset.name == "diabetes" and cfg.dataset.val_fraction == 0.2
    assert list(cfg.model.hidden) == [50] and cfg.model.dropout_rate == 0
    assert cfg.likelihood._target_.endswith("Gaussian") and cfg.likelihood.noise == "learned"
    t = cfg.trainer
    assert t.optimizer._target_ == "optax.adam" and t.schedule == 1e-2  # not 0.1: its YAML
    assert (t.epochs, t.batch_size, t.l2) == (40, 100, 0.0)
    mcd = compose_cfg("experiment=uci", "method=mc_dropout")
    assert (mcd.trainer.schedule, mcd.trainer.batch_size, mcd.trainer.epochs) == (1e-3, 128, 40)
    assert mcd.model.dropout_rate == 0.05 and mcd.method.members == 1000
    ens = compose_cfg("experiment=uci", "method=ensemble")
    assert ens.method.members == 5 and ens.likelihood.noise == "heteroscedastic"
    assert compose_cfg("experiment=uci", "method=map").likelihood.noise == "learned"
    hmc = compose_cfg("experiment=uci", "method=hmc")
    validate(hmc)
    assert "trainer" not in without_unread_trainer(hmc) and hmc.method.num_chains == 4


@pytest.mark.parametrize(
    "experiment,method,sizes,params",
    [
        # diabetes split 0: 398 training rows, 20% validate; 10·50 + 50 + 50 + 1 + log σ
        ("uci", "map", (80, 44), 602),
        ("toy_gap", "hmc", (20, 200), 151),  # 1·50 + 50 + 50 + 1, σ fixed
    ],
)
def test_regression_presets_dry_run(
    experiment, method, sizes, params, tmp_path, plan_only, monkeypatch
):
    """The dry run plans the preset on its regression data and writes nothing (not even
    diabetes' cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = compose_cfg(f"experiment={experiment}", f"method={method}", "dry_run=true")
    plan = run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    assert (plan["plan/val_size"], plan["plan/test_size"]) == sizes and plan[
        "plan/params"
    ] == params
