"""``multi``: an ensemble of independent fits of one method, pooled with equal weight.

MultiSWAG (Wilson & Izmailov, 2020) is ``fits`` independent SWAG runs, each from its own
MAP network; a multi-Laplace or an ensemble of VI fits is the same with another base.
With K fits of a base whose posterior has S₀ members, the predictive is

    p(y | x) ≈ (1/K) Σ_k (1/S₀) Σ_s p(y | x, θ_ks) = (1/(K S₀)) Σ_{k,s} p(y | x, θ_ks),

so pooling every fit's members in one summary weighs each fit equally (every fit of one
base config has the same S₀). S = K S₀ members in all.

Keys: fit 0 uses the run's key itself, so ``fits=1`` is exactly ``method=<base>`` of the
same seed (its members, metrics and saved MAP); fit k >= 1 uses
``fold_in(fold_in(key, MULTI_SALT), k)``, apart from the keys a base derives from its own
(e.g. Laplace's ``fold_in(key, 1..3)``). Fit k's key does not depend on ``fits``: a run
of K fits holds the K − 1 fits of the run with one fewer. The same rule derives each
fit's key for ``member_log_probs`` and ``report`` from theirs.

Each fit is the base's ``fit`` with a run context of its own: its checkpoint loops are
named ``<loop>.fit<k>`` (fit 0 keeps the base's names), so a resumed run restores every
fit from its own snapshots; its curves are logged after the previous fits' steps.

``report`` gives the mean over fits of each number the base reports (for a MAP-based
base, ``map/<set>/*`` is then the expected single MAP network, the baseline each fit
starts from); ``save`` writes fit 0's (the base run's MAP, for a later ``init_from``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jax
from flax import struct

from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.methods.base import Method, Posterior, RunContext, Work
from bnn_bench.models import Model

if TYPE_CHECKING:
    from bnn_bench.checkpoint import Checkpointer

MULTI_SALT = 0x6D756C74  # "mult": fits k >= 1 draw from fold_in(key, MULTI_SALT)


def fit_key(key: jax.Array, k: int) -> jax.Array:
    """The key of fit ``k``: the run's key for fit 0, else ``fold_in(fold_in(key,
    MULTI_SALT), k)``; the same whatever the number of fits."""
    return key if k == 0 else jax.random.fold_in(jax.random.fold_in(key, MULTI_SALT), k)


@dataclass
class FitContext(RunContext):
    """Fit ``index``'s view of the run context: its own checkpoint loops, its curves after
    the previous fits' steps; everything else is the run's.

    Attributes:
      parent: the run's context (checkpoint slots come from it).
      index: k, the fit.
    """

    parent: RunContext = dataclasses.field(default_factory=RunContext)
    index: int = 0

    def checkpoint(self, name: str) -> Checkpointer:
        """The slot ``<name>.fit<k>`` of the run's context (fit 0: ``name``)."""
        return self.parent.checkpoint(name if self.index == 0 else f"{name}.fit{self.index}")


def fit_context(ctx: RunContext, k: int, steps: int) -> FitContext:
    """Fit ``k``'s context: ``ctx``'s inputs, meter and checkpoints; its curves logged from
    step ``k * steps`` on (``steps``: one fit's)."""
    return FitContext(
        inputs=ctx.inputs,
        log=lambda values, step: ctx.log(values, step + k * steps),
        checkpoints=ctx.checkpoints,
        meter=ctx.meter,
        parent=ctx,
        index=k,
    )


def mean_numbers(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Each key's mean over the dicts that have it (in first-seen order)."""
    keys = dict.fromkeys(k for d in dicts for k in d)
    return {k: sum(float(d[k]) for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}


@struct.dataclass
class MultiPosterior:
    """The posteriors of the fits.

    Attributes:
      fits: the base's posterior of each fit, in fit order.
      info: the mean over fits of each of the base's ``info`` numbers, and ``multi/fits``.
    """

    model: Model = struct.field(pytree_node=False)
    fits: tuple[Posterior, ...]
    info: dict[str, float] = struct.field(default_factory=dict)


@dataclass(frozen=True)
class Multi(Method):
    """``fits`` independent fits of ``base``, their members pooled (module docstring).

    Attributes:
      base: the method fitted ``fits`` times (the ``method/base`` group; its keys are
        ``method.base.*``).
      fits: K, the independent fits; S = K × the base's members.
    """

    name = "multi"
    base: Method
    fits: int = 5

    def __post_init__(self):
        if not isinstance(self.base, Method):
            raise UserError(f"method.base must be a method (method/base=...); got {self.base!r}.")
        if self.fits < 1:
            raise UserError(f"method.fits must be >= 1; got {self.fits}.")
        if getattr(self.base, "init_from", None) is not None:
            raise UserError(
                "method.base.init_from: every fit would start from that one MAP network, one "
                "mode, not independent fits; drop it (each fit trains its own MAP)."
            )

    def check(self, model: Model, data: Dataset) -> None:
        """The base's refusals."""
        self.base.check(model, data)

    def plan(self, model: Model, data: Dataset) -> Work:
        """The base's work summed over the fits (they run one after another: ``steps`` of
        all, ``networks`` at once: one fit's)."""
        one = self.base.plan(model, data)
        return Work(
            steps=one.steps * self.fits,
            grad_evals=one.grad_evals * self.fits,
            members=one.members * self.fits,
            batch_size=one.batch_size,
            networks=one.networks,
        )

    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> MultiPosterior:
        """The base's ``fit`` once per fit, each from its own key and context."""
        ctx = ctx or RunContext()
        self.check(model, data)  # before the first fit
        steps = self.base.plan(model, data).steps
        fits = tuple(
            self.base.fit(fit_key(key, k), model, data, fit_context(ctx, k, steps))
            for k in range(self.fits)
        )
        info = mean_numbers([dict(p.info) for p in fits]) | {"multi/fits": float(self.fits)}
        return MultiPosterior(model=model, fits=fits, info=info)

    def member_log_probs(
        self, key: jax.Array, posterior: MultiPosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        """Every fit's members (s, N, C) in fit order, fit k's from its key."""
        for k, fit in enumerate(posterior.fits):
            yield from self.base.member_log_probs(fit_key(key, k), fit, x)

    def save(self, out_dir: Path, posterior: MultiPosterior) -> Path | None:
        """What the base saves of fit 0 (a MAP-based base: its MAP, the base run's)."""
        return self.base.save(out_dir, posterior.fits[0])

    def report(
        self, key: jax.Array, posterior: MultiPosterior, sets: dict[str, Split], num_bins: int
    ) -> dict[str, float]:
        """The mean over fits of each number the base reports (``map/<set>/*``: the
        expected single MAP network)."""
        return mean_numbers(
            [
                self.base.report(fit_key(key, k), fit, sets, num_bins)
                for k, fit in enumerate(posterior.fits)
            ]
        )
