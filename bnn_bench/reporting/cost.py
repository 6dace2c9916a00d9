"""What a result cost: gradient evaluations, samples, compile time, peak device memory.

``run.py`` opens one ``Meter`` around a run and hands it to the method in the run
context; loops and methods add their work to it, and ``cost/*`` goes into
metrics.json::

    with cost.Meter() as meter:                 # listens to JAX's compile events
        meter.count(grad_evals=num_steps)       # e.g. at the end of a training loop
    meter.metrics()                             # {"cost/grad_evals": ..., "cost/compile_s": ...}

Counts describe the algorithm's work (what an uninterrupted run does), so a loop
reports its total once, not what one attempt of a resumed run recomputed.
"""

from __future__ import annotations

from collections import defaultdict

import jax

# JAX's own timing events for tracing, lowering and XLA compilation.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class Meter:
    """Counts of one run: ``counts[name]`` plus the compile seconds spent while open.

    Outside a ``with`` block a meter still counts, but measures no compile time.
    """

    def __init__(self):
        self.counts: dict[str, float] = defaultdict(float)
        self.compile_s = 0.0

    def count(self, **amounts: float) -> None:
        """Adds ``amounts`` (e.g. ``grad_evals=1000, samples=1``) to the counts."""
        for k, v in amounts.items():
            self.counts[k] += float(v)

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        del kwargs
        if event in _COMPILE_EVENTS:
            self.compile_s += duration

    def __enter__(self) -> Meter:
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)

    def metrics(self) -> dict[str, float]:
        """``cost/<name>`` for every count, ``cost/compile_s``, and
        ``cost/peak_device_mib`` where the backend reports memory (GPUs; not the CPU)."""
        out = {f"cost/{k}": float(v) for k, v in sorted(self.counts.items())}
        out["cost/compile_s"] = self.compile_s
        peak = peak_device_bytes()
        if peak is not None:
            out["cost/peak_device_mib"] = peak / 2**20
        return out


def peak_device_bytes() -> int | None:
    """Peak bytes in use on the first device since the process started, or None where
    the backend does not say (``memory_stats()`` is None on the CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])
