"""``map``: a point estimate (maximum a posteriori with the trainer's weight decay). S = 1."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import serialization, struct

from bnn_bench import run_folder
from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.likelihoods import Gaussian, target_scale
from bnn_bench.methods.base import Method, RunContext, Work
from bnn_bench.methods.training import Trainer
from bnn_bench.models import Model, Params, State

CHECKPOINT = run_folder.MAP_POINT  # inside a run folder


@struct.dataclass
class PointPosterior:
    """A point estimate: one set of parameters and model state."""

    model: Model = struct.field(pytree_node=False)
    params: Params
    state: State
    info: dict[str, float] = struct.field(default_factory=dict)


@dataclass(frozen=True)
class MAP(Method):
    """Trains one network with ``trainer``; its softmax is the single member.

    Attributes:
      trainer: optimiser, schedule and budget (the ``trainer`` config group).
    """

    trainer: Trainer

    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> PointPosterior:
        ctx = ctx or RunContext()
        ts = self.trainer.train(key, model, data, ctx)
        ctx.count(samples=1)
        return PointPosterior(model=model, params=ts.params, state=ts.state)

    def member_log_probs(
        self, key: jax.Array, posterior: PointPosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        del key  # deterministic
        model = posterior.model
        yield jax.jit(model.log_probs)(posterior.params, posterior.state, x)[None]  # (1, N, C)

    def save(self, out_dir: Path, posterior: PointPosterior) -> Path:
        """Writes the trained network to ``<out_dir>/checkpoint/map.msgpack`` (for
        post-hoc methods' ``init_from``)."""
        return save_point(out_dir, posterior.params, posterior.state)

    def plan(self, model: Model, data: Dataset) -> Work:
        """Steps, gradient evaluations, members, batch and networks trained at once.

        For ``dry_run``: counts the work of ``fit`` without doing it (``data`` may
        hold shapes only); ``check`` makes the refusals."""
        del model
        steps = self.trainer.num_steps(data.train.size)
        return Work(
            steps=steps,
            grad_evals=steps,
            members=1,
            batch_size=self.trainer.batch_size,
            networks=1,
        )


def map_metrics(
    model: Model, params: Params, state: State, sets: dict[str, Split], num_bins: int
) -> dict[str, float]:
    """The metrics of the MAP network a method builds on, beside the method's own, so one
    run shows the gain: ``map/<set>/{acc,nll,ece,brier}`` for every set but ``ood``
    (regression: ``map/<set>/{rmse,nll}``, the target's original units)."""
    log_probs = jax.jit(model.log_probs)
    out: dict[str, float] = {}
    for name, split in sets.items():
        if name == "ood":  # its labels are not classes of this task
            continue
        lp = log_probs(params, state, split.x)
        if isinstance(model.likelihood, Gaussian):
            metrics = model.likelihood.point_metrics(lp, split.y, target_scale(model.spec))
            out |= {f"map/{name}/{k}": v for k, v in metrics.items()}
            continue
        p = jnp.exp(lp)
        out |= {
            f"map/{name}/acc": M.accuracy(p, split.y),
            f"map/{name}/nll": M.nll_of_log_probs(lp, split.y),
            f"map/{name}/ece": M.ece(p, split.y, num_bins),
            f"map/{name}/brier": M.brier(p, split.y),
        }
    return out


def save_point(out_dir: str | Path, params: Params, state: State) -> Path:
    """``<out_dir>/checkpoint/map.msgpack``: flax-serialised ``{"params", "state"}``."""
    path = Path(out_dir) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.to_bytes({"params": params, "state": state}))
    return path


def checkpoint_path(run_dir: str | Path) -> Path:
    """The MAP checkpoint of a run folder; a UserError if there is none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise UserError(
            f"init_from={run_dir}: no {CHECKPOINT} there. Point it at the folder "
            f"of a finished `method=map` (or laplace) run, or drop init_from to "
            f"train a network."
        )
    return path


def load_point(run_dir: str | Path, model: Model) -> tuple[Params, State]:
    """The ``(params, state)`` saved by ``save_point`` in ``run_dir``, checked against
    ``model``'s parameter shapes.

    Raises:
      UserError: no checkpoint, or one saved for another model or dataset.
    """
    path = checkpoint_path(run_dir)
    params, state = jax.eval_shape(model.init, jax.random.key(0))
    try:
        raw = serialization.msgpack_restore(path.read_bytes())
        loaded = serialization.from_state_dict({"params": params, "state": state}, raw)
    except Exception as e:  # noqa: BLE001 - any decoding failure means the same thing here
        raise UserError(
            f"init_from={run_dir}: {path} does not hold this model's parameters "
            f"({str(e).splitlines()[0][:200]}); was it saved with another "
            f"model or dataset?"
        ) from e
    want = jax.tree_util.tree_leaves_with_path({"params": params, "state": state})
    got = jax.tree.leaves(loaded)
    for (where, w), g in zip(want, got, strict=True):
        if tuple(w.shape) != tuple(g.shape):
            raise UserError(
                f"init_from={run_dir}: {jax.tree_util.keystr(where)} has shape "
                f"{tuple(g.shape)} in {path} but {tuple(w.shape)} in model "
                f"{model.name or type(model.module).__name__}; use the model and "
                f"dataset settings of that run."
            )
    loaded = jax.tree.map(jax.numpy.asarray, loaded)
    return loaded["params"], loaded["state"]
