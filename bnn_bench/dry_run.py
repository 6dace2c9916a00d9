"""``dry_run=true``: check a run and print its plan without doing the work.

Composes nothing itself (the config is Hydra's) and writes nothing. ``check``
builds what ``run`` builds, with shapes in place of data: the dataset's source
and split sizes (``data.resolve``: headers and metadata only; a download is probed
with the run's reachability check, not made), the model (checked against the
input shape), the method (its config checks), the method's own account of its
work (``Method.check``, then ``Method.plan``), and the evaluation sets. The run calls the same
``check`` before its work, so a job the dry run refuses, the run refuses with the
same message; only what needs the data itself (e.g. a file's image shape) is left
to the run.

Device memory is an estimate, stated as such in the plan: XLA's
``memory_analysis`` of one training step (``value_and_grad`` of the
cross-entropy, vmapped over the networks trained at once) and of one evaluation
batch, compiled for the backend the dry run runs on, whichever is larger; plus
two parameter-sized buffers per network for the optimiser or sampler state
(Adam's moments; more than SGLD needs), plus the uint8 evaluation and training
images the run keeps on the device and the predictive summaries. On the CPU, where
convolutions run as im2col (``models.layers``: patches 9x the activations), a model
with convolutions gets a second estimate, of the program a GPU runs
(``lax.conv_general_dilated``): WRN-28-10 at batch 128 needs ~13.9 GB as the CPU runs
it and ~4.4 GB as a GPU does.

``LeaveNothing``, a Hydra callback, removes the folders Hydra itself makes for a
dry run (the run or sweep folder, each job's folder) and restores a sweep folder's
``multirun.yaml``, so a dry run leaves the file system as it found it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bnn_bench.config import build
from bnn_bench.data import Dataset, Split
from bnn_bench.data.resolve import resolve
from bnn_bench.data.stored import config_key
from bnn_bench.errors import UserError
from bnn_bench.evaluation import fidelity, reference_file
from bnn_bench.evaluation.sets import ood_split
from bnn_bench.evaluation.settings import EvalSettings
from bnn_bench.evaluation.shift import is_tfds, level_name
from bnn_bench.methods.base import Work
from bnn_bench.models import Model, build_model, module_calls, num_params
from bnn_bench.models.layers import Conv, convolutions_as
from bnn_bench.parts import Parts

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Checked:
    """What ``check`` built of a run, with shapes in place of data.

    Attributes:
      settings: the evaluation settings.
      data: the dataset as ``resolve`` finds it (splits of ``jax.ShapeDtypeStruct``).
      model: the model, built on the dataset's input shape.
      method: the method.
      params: the model's parameter count.
      work: ``method.plan``'s account of its work (steps, members, ...).
      sets: inputs per evaluation set, by name.
      objective: None if ``objective.metric`` names a set of the run; else why a sweeper
        would get no value.
    """

    settings: EvalSettings
    data: Dataset
    model: Model
    method: Any
    params: int
    work: Work
    sets: dict[str, int]
    objective: str | None


def check(parts: Parts) -> Checked:
    """Every refusal a run can make before it reads data, made on shapes: the run
    calls it before its work, and the dry run before printing its plan, so the two
    refuse the same things with the same words.

    Finds the dataset's source (a download is probed, not made), builds the model on
    its input shape and the method, lets the method refuse what ``fit`` would refuse
    (``check``), asks it for its work (``plan``) and sizes the evaluation sets.

    Raises:
      UserError: what was wrong, naming the key.
    """
    settings, method, module = parts.settings, parts.method, parts.module
    data = resolve(parts.dataset)
    model = build_model(module, data.spec, parts.model_name, settings.batch_size, parts.likelihood)
    params, _ = jax.eval_shape(model.init, jax.random.key(0))
    method.check(model, data)
    work = method.plan(model, data)
    sets = set_sizes(data, settings)
    reference_file.check_file(
        settings, data.spec.name, data.spec.num_classes, sets
    )  # order: the run
    metric = parts.objective.metric
    objective = None
    if metric.split("/")[0] not in sets:
        objective = (
            f"objective.metric={metric} names the evaluation set {metric.split('/')[0]!r}, "
            f"which this run does not have (it has {', '.join(sets)}), so a sweeper would "
            f"get no value. Name a set it has, or give it a validation split "
            f"(dataset.val_fraction > 0) for val/*."
        )
        if _tuning():
            raise UserError(objective)
    return Checked(settings, data, model, method, num_params(params), work, sets, objective)


def _tuning() -> bool:
    """Whether a sweeper other than Hydra's basic one waits for the objective's value."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    target = str(OmegaConf.select(HydraConfig.get(), "sweeper._target_", default="") or "")
    return HydraConfig.get().mode == RunMode.MULTIRUN and not target.endswith("BasicSweeper")


def plan(parts: Parts) -> dict[str, float]:
    """Checks the run of ``parts`` as the run does (``check``), prints its plan, returns
    its numbers (``plan/steps``, ``plan/grad_evals``, ``plan/members``, ``plan/params``,
    ``plan/device_mib``, ``plan/<set>_size``).

    Raises:
      UserError: what the run itself would stop with (before its expensive work).
    """
    c = check(parts)
    data, model, work, sets = c.data, c.model, c.work, c.sets
    memory, how = device_memory(model, data, c.settings, work, sets)
    numbers = {
        "plan/steps": float(work.steps),
        "plan/grad_evals": float(work.grad_evals),
        "plan/members": float(work.members),
        "plan/params": float(c.params),
        "plan/device_mib": memory / MIB,
        **{f"plan/{name}_size": float(n) for name, n in sets.items()},
    }
    objective = f"{parts.objective.metric} ({parts.objective.direction})"
    note = fidelity.augmentation_note(data.spec.augment, c.settings.reference)
    print(
        "\n".join(
            [
                "dry run (nothing was trained or written):",
                f"  data       {data.spec.name} from {data.source}: train {data.train.size:,}, "
                f"val {0 if data.val is None else data.val.size:,}, test {data.test.size:,}; "
                f"input {data.spec.input_shape}",
                f"  model      {model.name}: {c.params:,} parameters",
                f"  method     {type(c.method).__name__}: {work.steps:,} steps, "
                f"{work.grad_evals:,} gradient evaluations, "
                f"{work.members:,} members",
                "  eval sets  " + ", ".join(f"{k} ({n:,})" for k, n in sets.items()),
                f"  objective  {objective if c.objective is None else 'none: ' + c.objective}",
                f"  memory     ~{memory / MIB:,.1f} MiB on {jax.default_backend()} ({how})",
                *([f"  reference  note: {note}"] if note else []),
            ]
        ),
        flush=True,
    )
    return numbers


def set_sizes(data: Dataset, settings: EvalSettings) -> dict[str, int]:
    """Inputs per evaluation set, as ``evaluation_sets`` would build them; raises its errors."""
    sizes = {"test": data.test.size}
    if data.val is not None:
        sizes["val"] = data.val.size
    if settings.ood_dataset is not None:
        with config_key("eval.ood_dataset"):  # its errors name its keys there
            ood = resolve(build(settings.ood_dataset, "eval.ood_dataset"))
        # the real check, traced on shapes: resizes and compares without data
        jax.eval_shape(
            lambda t: ood_split(dataclasses.replace(ood, test=Split(*t)), data.spec.shape),
            tuple(ood.test),
        )
        sizes["ood"] = ood.test.size
    n_shift = min(settings.shift_size or data.test.size, data.test.size)
    for name, level in settings.shift_sets():
        if is_tfds(name) and tuple(data.spec.shape) != (32, 32, 3):
            raise UserError(
                f"eval.shift={name} is CIFAR-10-C (32x32x3 images); the dataset's images "
                f"are {tuple(data.spec.shape)}. Use it with dataset=cifar10."
            )
        sizes[f"shift/{name}/{level_name(level)}"] = n_shift
    return sizes


def device_memory(
    model: Model, data: Dataset, settings: EvalSettings, work: Work, sets: dict
) -> tuple[float, str]:
    """Estimated peak device bytes of the run, and how it was estimated (module docstring)."""
    networks = work.networks
    batch = work.batch_size
    eval_batch = max(1, min(settings.batch_size, max(sets.values())))
    step = _compiled_bytes(model, networks, batch, True, None)
    forward = _compiled_bytes(model, networks, eval_batch, False, None)
    params, _ = jax.eval_shape(model.init, jax.random.key(0))
    param_bytes = sum(math.prod(p.shape) * p.dtype.itemsize for p in jax.tree.leaves(params))
    image = math.prod(data.spec.shape)
    stored = data.train.size + (0 if data.val is None else data.val.size)
    images = image * (stored + sum(n for k, n in sets.items() if k != "val"))
    summaries = sum(sets.values()) * data.spec.num_classes * 4 * 3
    rest = 2 * networks * param_bytes + images + summaries
    total = max(step, forward) + rest
    how = (
        f"XLA memory_analysis: training step {step / MIB:,.1f} MiB at batch {batch} x "
        f"{networks} network(s), evaluation batch {forward / MIB:,.1f} MiB at {eval_batch}; "
        f"+ optimiser/sampler state {2 * networks * param_bytes / MIB:,.1f} MiB, "
        f"images {images / MIB:,.1f} MiB, summaries {summaries / MIB:,.1f} MiB"
    )
    if jax.default_backend() == "cpu" and any(
        isinstance(c.module, Conv) for c in module_calls(model)
    ):
        gpu_step = _compiled_bytes(model, networks, batch, True, False)
        gpu_forward = _compiled_bytes(model, networks, eval_batch, False, False)
        how += (
            f"; ~{(max(gpu_step, gpu_forward) + rest) / MIB:,.1f} MiB on a GPU, whose "
            f"convolutions are not im2col: training step {gpu_step / MIB:,.1f} MiB, "
            f"evaluation batch {gpu_forward / MIB:,.1f} MiB"
        )
    return float(total), how


@functools.lru_cache(maxsize=64)
def _compiled_bytes(
    model: Model, networks: int, batch: int, train: bool, im2col: bool | None
) -> int:
    """Peak bytes XLA reports for one training step (value_and_grad) or one evaluation
    batch (softmax) of ``networks`` vmapped copies of ``model``; convolutions as
    ``im2col`` says (None: as this backend runs them; ``layers.conv2d``)."""
    params, state = jax.eval_shape(model.init, jax.random.key(0))
    stack = lambda t: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct((networks, *a.shape), a.dtype), t
    )
    x = jax.ShapeDtypeStruct((networks, batch, *model.spec.shape), jnp.uint8)
    y = jax.ShapeDtypeStruct((networks, batch), jnp.int32)

    def loss(p: Any, s: Any, xb: jax.Array, yb: jax.Array) -> jax.Array:
        logits, _ = model.apply(p, s, xb, train=True, key=jax.random.key(0))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

    def forward(p: Any, s: Any, xb: jax.Array, yb: jax.Array) -> jax.Array:
        del yb
        return jax.nn.softmax(model.apply(p, s, xb)[0])

    fn = jax.vmap(jax.value_and_grad(loss) if train else forward)
    with convolutions_as(im2col) if im2col is not None else contextlib.nullcontext():
        lowered = jax.jit(fn).lower(stack(params), stack(state), x, y)
    stats = lowered.compile().memory_analysis()
    if stats is None:  # a backend without the analysis
        return 0
    # arguments + outputs + temporaries; on the CPU, peak_memory_in_bytes leaves out the
    # temporaries (the activations kept for the backward pass)
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return int(max(total, getattr(stats, "peak_memory_in_bytes", 0)))


class LeaveNothing(Callback):
    """A Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): a dry run leaves
    the file system as it found it.

    Hydra makes the run folder (a sweep folder, each job's folder in it, and its
    ``multirun.yaml``) before a job starts; a dry run writes nothing into them (its
    run.log opens only on the first record, and the dry run detaches it first). At the
    end, and at exit after a refusal, the folders that were not there before are removed
    if still empty, and ``multirun.yaml`` is put back as it was.
    """

    def __init__(self) -> None:
        self._top: Path | None = None
        self._base: Path | None = None  # the nearest folder that was there before
        self._dirs: set[Path] = set()
        self._multirun_yaml: bytes | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        del kwargs
        if config.get("dry_run") is True:
            self._remember(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        del kwargs
        if config.get("dry_run") is True:
            self._remember(Path(config.hydra.sweep.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        del config, kwargs
        self.restore()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        del config, kwargs
        self.restore()

    def _remember(self, top: Path) -> None:
        self._top = top.absolute()
        base = self._top
        while not base.exists() and base != base.parent:
            base = base.parent
        self._base = base
        self._dirs = set(_folders(self._top))
        yaml = self._top / "multirun.yaml"
        self._multirun_yaml = yaml.read_bytes() if yaml.is_file() else None
        atexit.register(self.restore)  # a refused single run leaves by sys.exit(2)

    def restore(self) -> None:
        """Undoes Hydra's folders and ``multirun.yaml`` of the dry run (idempotent)."""
        top, self._top = self._top, None
        if top is None or self._base is None:
            return
        yaml = top / "multirun.yaml"
        if yaml.is_file():
            if self._multirun_yaml is None:
                yaml.unlink()
            elif yaml.read_bytes() != self._multirun_yaml:
                yaml.write_bytes(self._multirun_yaml)
        new = [p for p in _folders(top) if p not in self._dirs]
        parents = [top, *top.parents]
        new += parents[: parents.index(self._base)] if self._base in parents else []
        for folder in sorted(set(new), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: someone else's, keep it
                folder.rmdir()


def _folders(top: Path) -> list[Path]:
    return [p for p in top.rglob("*") if p.is_dir()] if top.is_dir() else []
