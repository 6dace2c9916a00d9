"""``dry_run=true``: check a run and print its plan without doing the work.

Composes nothing itself (the config is Hydra's) and writes nothing. It builds
what ``run`` builds, with shapes in place of data: the dataset's source and split
sizes (``data.resolve``: headers and metadata only), the model (checked against
the input shape), the method (its config checks), the method's own account of
its work (``Method.describe``), and the evaluation sets. A job that would fail
raises the ``UserError`` the real run would raise.

Device memory is an estimate, stated as such in the plan: XLA's
``memory_analysis`` of one training step (``value_and_grad`` of the
cross-entropy, vmapped over the networks trained at once) and of one evaluation
batch, compiled for the backend the dry run runs on, whichever is larger; plus
two parameter-sized buffers per network for the optimiser or sampler state
(Adam's moments; more than SGLD needs), plus the uint8 evaluation and training
images the run keeps on the device and the predictive summaries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from omegaconf import DictConfig

from bnn_bench.config import build
from bnn_bench.data import Dataset, Split
from bnn_bench.data.resolve import resolve
from bnn_bench.errors import UserError
from bnn_bench.evaluation.sets import ood_split
from bnn_bench.evaluation.settings import EvalSettings
from bnn_bench.evaluation.shift import is_tfds, level_name
from bnn_bench.models import Model, build_model, num_params

MIB = 2**20


def plan(cfg: DictConfig) -> dict[str, float]:
    """Builds the run of ``cfg`` without data, prints its plan, returns its numbers
    (``plan/steps``, ``plan/grad_evals``, ``plan/members``, ``plan/params``,
    ``plan/device_mib``, ``plan/<set>_size``).

    Raises:
      UserError: what the run itself would stop with (before its expensive work).
    """
    settings: EvalSettings = build(cfg.eval, "eval")
    data = resolve(cfg.dataset)
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    model = build_model(module, data.spec, type(module).__name__.lower(), settings.batch_size)
    method = build(cfg.method, "method")
    params, _ = jax.eval_shape(model.init, jax.random.key(0))
    n_params = num_params(params)
    work = method.describe(model, data)
    sets = set_sizes(data, settings)
    metric = str(cfg.objective.metric)
    if metric.split("/")[0] not in sets:
        raise UserError(
            f"objective.metric={metric} names the evaluation set {metric.split('/')[0]!r}, "
            f"which this run does not have (it has {', '.join(sets)}). Choose e.g. "
            f"objective.metric=val/nll (needs dataset.val_fraction > 0)."
        )
    memory, how = device_memory(model, data, settings, work, sets)
    numbers = {
        "plan/steps": float(work.get("steps", 0)),
        "plan/grad_evals": float(work.get("grad_evals", 0)),
        "plan/members": float(work.get("members", 0)),
        "plan/params": float(n_params),
        "plan/device_mib": memory / MIB,
        **{f"plan/{name}_size": float(n) for name, n in sets.items()},
    }
    print(
        "\n".join(
            [
                "dry run (nothing was trained or written):",
                f"  data       {data.spec.name} from {data.source}: train {data.train.size:,}, "
                f"val {0 if data.val is None else data.val.size:,}, test {data.test.size:,}; "
                f"input {data.spec.input_shape}",
                f"  model      {model.name}: {n_params:,} parameters",
                f"  method     {type(method).__name__}: {int(work.get('steps', 0)):,} steps, "
                f"{int(work.get('grad_evals', 0)):,} gradient evaluations, "
                f"{int(work.get('members', 0)):,} members",
                "  eval sets  " + ", ".join(f"{k} ({n:,})" for k, n in sets.items()),
                f"  objective  {metric} ({cfg.objective.direction})",
                f"  memory     ~{memory / MIB:,.1f} MiB on {jax.default_backend()} ({how})",
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
        ood = resolve(settings.ood_dataset)
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
    model: Model, data: Dataset, settings: EvalSettings, work: dict[str, float], sets: dict
) -> tuple[float, str]:
    """Estimated peak device bytes of the run, and how it was estimated (module docstring)."""
    networks = int(work.get("networks", 1))
    batch = int(work.get("batch_size", 128))
    eval_batch = max(1, min(settings.batch_size, max(sets.values())))
    step = _compiled_bytes(model, networks, batch, True)
    forward = _compiled_bytes(model, networks, eval_batch, False)
    params, _ = jax.eval_shape(model.init, jax.random.key(0))
    param_bytes = sum(math.prod(p.shape) * p.dtype.itemsize for p in jax.tree.leaves(params))
    image = math.prod(data.spec.shape)
    stored = data.train.size + (0 if data.val is None else data.val.size)
    images = image * (stored + sum(n for k, n in sets.items() if k != "val"))
    summaries = sum(sets.values()) * data.spec.num_classes * 4 * 3
    total = max(step, forward) + 2 * networks * param_bytes + images + summaries
    how = (
        f"XLA memory_analysis: training step {step / MIB:,.1f} MiB at batch {batch} x "
        f"{networks} network(s), evaluation batch {forward / MIB:,.1f} MiB at {eval_batch}; "
        f"+ optimiser/sampler state {2 * networks * param_bytes / MIB:,.1f} MiB, "
        f"images {images / MIB:,.1f} MiB, summaries {summaries / MIB:,.1f} MiB"
    )
    return float(total), how


@functools.lru_cache(maxsize=64)
def _compiled_bytes(model: Model, networks: int, batch: int, train: bool) -> int:
    """Peak bytes XLA reports for one training step (value_and_grad) or one evaluation
    batch (softmax) of ``networks`` vmapped copies of ``model``."""
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
    stats = jax.jit(fn).lower(stack(params), stack(state), x, y).compile().memory_analysis()
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
