"""The method contract: ``fit`` to a posterior, then members that give class log-probabilities.

Every method, however different inside, ends in S members, each giving class
log-probabilities (the log-softmax of its logits, so that a log-likelihood is exact
however small the probability) for every evaluation input. ``predict`` folds them into one
``PredictiveSummary`` per evaluation set; evaluation never knows which method ran.

Every method subclasses ``Method``; ``run.py`` calls each of its hooks (``check``,
``fit``, ``predict``, ``save``, ``report``) unconditionally, and the dry run calls
``check`` and ``plan``. A method declares what it ``needs`` of a model (``Need``: with or
without batch norm, dropout, ...); ``check`` refuses the rest, one message per trait, for
the run and the dry run alike. A method talks to the run only
through the ``RunContext`` given to ``fit``: the logger, a checkpoint slot per loop
name, the cost counter and the evaluation inputs. No module-level state.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import jax

from bnn_bench.checkpoint import Checkpointer, Session
from bnn_bench.data import Dataset, Split
from bnn_bench.errors import UserError
from bnn_bench.evaluation.summary import EvalInputs, PredictiveSummary
from bnn_bench.models import TRAITS, Model
from bnn_bench.reporting.cost import Meter

Posterior = Any  # a pytree with ``model`` (static) and ``info`` (a dict of numbers)
LogFn = Callable[[dict[str, float], int], None]  # (values, step) -> None


def no_log(values: dict[str, float], step: int) -> None:
    del values, step


@dataclass
class RunContext:
    """How a method talks to its run; ``RunContext()`` is a quiet one for use outside a run.

    Attributes:
      inputs: the evaluation inputs, all known before ``fit`` (samplers fold members into
        them while sampling); None outside a run.
      log: receives training curves ``(values, step)``.
      checkpoints: the run's checkpoint session; None: nothing is saved or resumed.
      meter: the run's cost counter (gradient evaluations, samples).
    """

    inputs: EvalInputs | None = None
    log: LogFn = no_log
    checkpoints: Session | None = None
    meter: Meter = field(default_factory=Meter)

    def checkpoint(self, name: str) -> Checkpointer:
        """The checkpoint slot of the loop called ``name`` (a disabled one outside a run)."""
        return Checkpointer(None) if self.checkpoints is None else self.checkpoints.loop(name)

    def count(self, **amounts: float) -> None:
        """Adds the method's own work (``grad_evals=...``, ``samples=...``) to the run's cost."""
        self.meter.count(**amounts)


@dataclass(frozen=True)
class Work:
    """What a run of a method will do, counted without doing it (``Method.plan``).

    Attributes:
      steps: optimiser or sampler steps (of one network or chain; with a MAP step, the MAP's
        steps plus the method's own).
      grad_evals: minibatch gradient evaluations of all networks together.
      members: S, the members the predictive averages.
      batch_size: the training batch of one network (its examples per gradient).
      networks: networks trained or chains run at once (device memory scales with it).
    """

    steps: int
    grad_evals: int
    members: int
    batch_size: int
    networks: int = 1


@dataclass(frozen=True)
class Need:
    """What a method needs of a model: a trait it must have (``present=True``) or lack.

    Attributes:
      trait: a key of ``models.TRAITS`` (``batch_norm``, ``dropout``, ``depthwise``).
      present: True: the model must have the trait; False: it must not.
      why: the reason, one clause (it completes "because ...").
    """

    trait: str
    present: bool
    why: str

    def refusal(self, method: str, model: Model) -> str | None:
        """None if ``model`` meets the need; else the one message for this trait."""
        trait = TRAITS[self.trait]
        if trait.of(model) == self.present:
            return None
        lacks = "none" if trait.instead is None else trait.instead(model)
        has = f"has {lacks}" if self.present else f"has {trait.noun}"
        fix = trait.with_ if self.present else trait.without
        return (
            f"method={method} needs a model {'with' if self.present else 'without'} "
            f"{trait.noun} ({self.why}), and model {model.name or type(model.module).__name__} "
            f"{has}. {fix}"
        )


class Method(abc.ABC):
    """What ``run.py`` needs of a method. Subclasses implement ``fit``, ``member_log_probs`` and
    ``plan``; ``predict`` streams ``member_log_probs`` into the summaries chunk by chunk (memory
    O(N·C)); ``check`` refuses a model that lacks what ``needs`` declares (subclasses add
    their own refusals after ``super().check``); ``save`` and ``report`` do nothing unless
    overridden.

    Attributes:
      needs: what the method needs of a model (checked by ``check``).
      name: how the method is named in messages (its ``method=`` choice).
    """

    needs: ClassVar[tuple[Need, ...]] = ()
    name: ClassVar[str] = ""

    def check(self, model: Model, data: Dataset) -> None:
        """Raises what ``fit`` would refuse, before any work: the run and the dry run call
        it (``data`` may hold shapes only).

        Raises:
          UserError: what was wrong and what to do.
        """
        del data
        for need in self.needs:
            message = need.refusal(self.name or type(self).__name__.lower(), model)
            if message is not None:
                raise UserError(message)

    @abc.abstractmethod
    def plan(self, model: Model, data: Dataset) -> Work:
        """The work of ``fit`` and ``predict`` without doing it (``data`` may hold shapes
        only): steps, gradient evaluations, members, batch and networks."""

    @abc.abstractmethod
    def fit(
        self, key: jax.Array, model: Model, data: Dataset, ctx: RunContext | None = None
    ) -> Posterior:
        """Infers the posterior; counts its samples and gradient evaluations in ``ctx``.
        The posterior's ``info`` holds the numbers the method measured itself."""

    @abc.abstractmethod
    def member_log_probs(
        self, key: jax.Array, posterior: Posterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        """Yields the members' ``Likelihood.member`` in chunks for inputs x (N, ...):
        class log-probabilities (s, N, C) for classification (the log-softmax of the
        logits, never the log of a rounded probability), (s, N, 2) = (μ, log σ) in
        standardised target units for the Gaussian likelihood (regression). The chunk
        sizes add up to S. The same key gives the same members for any x."""

    def predict(
        self, key: jax.Array, posterior: Posterior, inputs: EvalInputs
    ) -> dict[str, PredictiveSummary]:
        """One summary per evaluation set of ``plan``."""
        model = posterior.model
        summaries = inputs.empty(model.likelihood.member_width(model.spec.num_classes))
        for name, x in inputs.x.items():
            for log_probs in self.member_log_probs(key, posterior, x):
                summaries[name] = summaries[name].add(log_probs)
        return summaries

    def save(self, out_dir: Path, posterior: Posterior) -> Path | None:
        """Writes what a later run can reuse (MAP parameters for ``init_from``, SG-MCMC
        samples) into the run folder; returns its path, or None if nothing is kept."""
        del out_dir, posterior
        return None

    def report(
        self,
        key: jax.Array,
        posterior: Posterior,
        sets: dict[str, Split],
        num_bins: int,
    ) -> dict[str, float]:
        """Numbers that need the evaluation sets, beside the predictive's metrics: e.g. the
        MAP a method builds on (``map/test/acc``), each voter's own metrics.

        Args:
          sets: the evaluation sets (inputs and labels) by name.
          num_bins: the calibration bins of the run's evaluation (``eval.num_bins``).
        """
        del key, posterior, sets, num_bins
        return {}
