"""``temperature``: post-hoc temperature scaling (Guo et al., 2017). S = 1.

A MAP network's logits z(x) are divided by one scalar T > 0 fitted on the validation
split by minimising the negative log-likelihood:

    T* = argmin_T  −(1/n) Σ_i log softmax(z(x_i) / T)_{y_i},   p(y | x) = softmax(z(x) / T*)

The NLL is convex in β = 1/T, so it has one minimum on any interval of log T, which a
bounded 1-D solver (Brent) finds. T only rescales confidence: the argmax, hence the
accuracy, is the MAP's. The MAP network is trained with the ``trainer`` group (the
network ``method=map`` trains with the same seed) or loaded from an earlier run
(``init_from``); its own metrics are reported as ``map/<set>/*``.

Its regression form (``likelihood=gaussian``) is σ scaling (Levi et al., 2019;
Kuleshov et al., 2018's recalibration by one scalar): every predicted σ is multiplied by
one s > 0 fitted on the validation split by minimising the Gaussian NLL, whose minimum
is closed-form, s² = mean_i ((y_i − μ_i) / σ_i)².
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from bnn_bench.data import Dataset
from bnn_bench.errors import UserError
from bnn_bench.likelihoods import Gaussian
from bnn_bench.methods.base import RunContext, Work
from bnn_bench.methods.posthoc.base import PostHoc
from bnn_bench.models import Model, Params, State

log = logging.getLogger(__name__)


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / temperature)`` in float64.

    Args:
      logits: (N, C) logits.
      labels: (N,) integer labels.
      temperature: T > 0.
    """
    z = np.asarray(logits, np.float64) / temperature
    y = np.asarray(labels).astype(np.int64)
    picked = np.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    return float(np.mean(logsumexp(z, axis=-1) - picked))


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    temperature_range: tuple[float, float] = (0.05, 20.0),
    tol: float = 1e-7,
) -> float:
    """The T in ``temperature_range`` that minimises ``temperature_nll`` (Guo et al., 2017).

    Brent's bounded method on u = log T: the NLL is convex in 1/T, so unimodal in u.

    Args:
      logits: (N, C) validation logits.
      labels: (N,) validation labels.
      temperature_range: [low, high] searched, 0 < low < high.
      tol: absolute tolerance on log T.

    Returns:
      The fitted temperature T*.

    >>> z = np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]); y = np.array([0, 1, 1])
    >>> t = fit_temperature(z, y)  # one of three confident predictions is wrong: T > 1
    >>> bool(t > 1.0)
    True
    """
    low, high = (float(v) for v in temperature_range)
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels).astype(np.int64)
    res = minimize_scalar(
        lambda u: temperature_nll(z, y, math.exp(u)),
        bounds=(math.log(low), math.log(high)),
        method="bounded",
        options={"xatol": tol},
    )
    return float(math.exp(res.x))


@struct.dataclass
class TemperedPosterior:
    """The MAP network and its temperature.

    Attributes:
      params, state: the MAP network.
      temperature: () the fitted T (regression: the σ scale s).
      info: ``temperature/*``: the fitted T (or s), and the validation NLL before and after.
    """

    model: Model = struct.field(pytree_node=False)
    params: Params
    state: State
    temperature: jax.Array
    info: dict[str, float] = struct.field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TemperatureScaling(PostHoc):
    """A MAP network whose logits are divided by a temperature fitted on the validation split.

    Attributes:
      trainer, init_from: the MAP network (``PostHoc``).
      temperature_range: [low, high], the interval T is searched in.
    """

    name: ClassVar = "temperature"

    temperature_range: tuple[float, float] = (0.05, 20.0)

    def __post_init__(self):
        super().__post_init__()
        low, high = (float(v) for v in self.temperature_range)
        if not 0 < low < high:
            raise UserError(
                f"method.temperature_range must be [low, high] with 0 < low < high; "
                f"got {list(self.temperature_range)}."
            )

    def check(self, model: Model, data: Dataset) -> None:
        """Refuses a dataset without a validation split (T is fitted on it)."""
        super().check(model, data)
        if data.val is None:
            raise UserError(
                "method=temperature fits T on the validation split, and this dataset "
                "has none; set dataset.val_fraction > 0 (e.g. dataset.val_fraction=0.1)."
            )

    def fit_map(
        self,
        key: jax.Array,
        model: Model,
        data: Dataset,
        params: Params,
        state: State,
        ctx: RunContext,
    ) -> TemperedPosterior:
        """Fits T on the validation logits of the MAP network ``(params, state)``
        (regression: the σ scale s on its validation members)."""
        del key  # deterministic
        if isinstance(model.likelihood, Gaussian):
            return self._fit_sigma_scale(model, data, params, state, ctx)
        logits = jax.jit(model.logits)(params, state, data.val.x)  # (n_val, C)
        t = fit_temperature(logits, data.val.y, self.temperature_range)
        before = temperature_nll(logits, data.val.y, 1.0)
        after = temperature_nll(logits, data.val.y, t)
        low, high = (float(v) for v in self.temperature_range)
        if min(abs(math.log(t / low)), abs(math.log(t / high))) < 1e-3:
            log.warning(
                "temperature %.4g is at an end of method.temperature_range %s; widen it.",
                t,
                [low, high],
            )
        log.info("temperature %.4f: validation NLL %.4f -> %.4f", t, before, after)
        ctx.count(samples=1)
        return TemperedPosterior(
            model=model,
            params=params,
            state=state,
            temperature=jnp.asarray(t, jnp.float32),
            info={
                "temperature/logit_temperature": t,
                "temperature/val_nll_map": before,
                "temperature/val_nll": after,
            },
        )

    def _fit_sigma_scale(
        self, model: Model, data: Dataset, params: Params, state: State, ctx: RunContext
    ) -> TemperedPosterior:
        """σ scaling: s = √mean(z²), z = (y − μ) / σ on the validation split; its
        ``temperature`` is s."""
        lik = model.likelihood
        members = np.asarray(jax.jit(model.log_probs)(params, state, data.val.x), np.float64)
        y = np.asarray(data.val.y, np.float64)
        z = (y - members[:, 0]) * np.exp(-members[:, 1])
        scale = float(np.sqrt(np.mean(np.square(z))))
        before = lik.member_nll(members, y)
        after = lik.member_nll(np.stack([members[:, 0], members[:, 1] + math.log(scale)], -1), y)
        log.info("σ scale %.4f: validation NLL %.4f -> %.4f", scale, before, after)
        ctx.count(samples=1)
        return TemperedPosterior(
            model=model,
            params=params,
            state=state,
            temperature=jnp.asarray(scale, jnp.float32),
            info={
                "temperature/sigma_scale": scale,
                "temperature/val_nll_map": before,
                "temperature/val_nll": after,
            },
        )

    def member_log_probs(
        self, key: jax.Array, posterior: TemperedPosterior, x: jax.Array
    ) -> Iterator[jax.Array]:
        """One member (1, N, C): the MAP's logits divided by T (regression: (1, N, 2),
        the MAP's μ and its σ times s)."""
        del key  # deterministic
        model = posterior.model
        if isinstance(model.likelihood, Gaussian):
            members = jax.jit(model.log_probs)(posterior.params, posterior.state, x)  # (N, 2)
            yield members.at[:, 1].add(jnp.log(posterior.temperature))[None]
            return
        logits = jax.jit(model.logits)(posterior.params, posterior.state, x)  # (N, C)
        yield jax.nn.log_softmax(logits / posterior.temperature, axis=-1)[None]  # (1, N, C)

    def plan_map(self, model: Model, data: Dataset) -> Work:
        """No steps after the MAP; one member."""
        return Work(steps=0, grad_evals=0, members=1, batch_size=0)
