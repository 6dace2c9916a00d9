"""The MAP network that post-hoc methods start from: trained, or loaded from a run.

Temperature scaling, MC dropout and SWAG start from a MAP network: trained with the
``trainer`` group from the run's key (so it is the network ``method=map`` trains with
the same seed), or loaded from an earlier run's ``checkpoint/map.msgpack``
(``init_from``). They save it for a later ``init_from`` and report its metrics beside
their own (``map/<set>/*``, ``methods/map.py::map_metrics``), so one run shows the gain
over the baseline.
"""

from __future__ import annotations

import logging
import time

import jax

from bnn_bench.data import Dataset
from bnn_bench.methods.base import RunContext
from bnn_bench.methods.map import checkpoint_path, load_point
from bnn_bench.methods.training import Trainer
from bnn_bench.models import Model, Params, State

log = logging.getLogger(__name__)


def map_point(
    key: jax.Array,
    model: Model,
    data: Dataset,
    trainer: Trainer,
    init_from: str | None,
    ctx: RunContext,
) -> tuple[Params, State]:
    """The MAP network's ``(params, state)``: loaded from ``init_from`` if given, else
    trained with ``trainer`` from ``key`` (the key ``method=map`` trains with), as the
    run context's loop ``trainer`` (checkpointed and resumed like a ``map`` run)."""
    tic = time.perf_counter()
    if init_from is not None:
        params, state = load_point(init_from, model)
        log.info("loaded MAP from %s", checkpoint_path(init_from))
        return params, state
    ts = trainer.train(key, model, data, ctx)
    log.info("trained MAP in %.1fs", time.perf_counter() - tic)
    return ts.params, ts.state
