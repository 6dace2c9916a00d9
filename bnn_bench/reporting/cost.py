"""What a result cost: gradient evaluations, compile time, peak device memory.

Loops report their work with ``count`` (a no-op outside a run); ``run.py`` opens a
``meter`` around the run and writes ``cost/*`` into metrics.json::

    cost.count(grad_evals=num_steps)          # e.g. at the end of a training loop

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
    """Counts of one run: ``counts[name]`` plus compile seconds."""

    def __init__(self):
        self.counts: dict[str, float] = defaultdict(float)
        self.compile_s = 0.0

    def metrics(self) -> dict[str, float]:
        """``cost/<name>`` for every count, ``cost/compile_s``, and
        ``cost/peak_device_mib`` where the backend reports memory (GPUs; not the CPU)."""
        out = {f"cost/{k}": float(v) for k, v in sorted(self.counts.items())}
        out["cost/compile_s"] = self.compile_s
        peak = peak_device_bytes()
        if peak is not None:
            out["cost/peak_device_mib"] = peak / 2**20
        return out


_active: list[Meter] = []  # the current run's meter (at most one)


def _on_duration(event: str, duration: float, **kwargs) -> None:
    del kwargs
    if _active and event in _COMPILE_EVENTS:
        _active[0].compile_s += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def count(**amounts: float) -> None:
    """Adds ``amounts`` (e.g. ``grad_evals=1000``) to the current run's meter."""
    if _active:
        for k, v in amounts.items():
            _active[0].counts[k] += float(v)


def start() -> Meter:
    """A new meter for the run that starts now; it replaces the previous run's."""
    _active[:] = [Meter()]
    return _active[0]


def peak_device_bytes() -> int | None:
    """Peak bytes in use on the first device since the process started, or None where
    the backend does not say (``memory_stats()`` is None on the CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])
