"""Step-size schedules of the SG-MCMC samplers.

A schedule is built from the config (``method.step_size``) and called as
``schedule(step, num_steps)`` with the 0-based step index (an int or a traced
int array) and the run's total number of steps; it returns the step size ε of
that step. ``schedule.sampling_stage(step, num_steps)`` says whether the step
samples (noise on, samples may be kept) or explores (no noise, no samples; only
the cyclical schedule has such steps). Both are jittable and work on NumPy arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp

from bnn_bench.errors import UserError


class Schedule:
    """The base of every schedule: all steps sample unless a schedule says otherwise."""

    def sampling_stage(self, step, num_steps: int):
        """True where step ``step`` samples: its noise is on and its sample may be kept."""
        del num_steps
        return jnp.full(jnp.shape(step), True)


@dataclass(frozen=True)
class Constant(Schedule):
    """ε_t = step_size."""

    step_size: float

    def __call__(self, step, num_steps: int):
        del num_steps
        return jnp.full(jnp.shape(step), self.step_size, jnp.float32)


@dataclass(frozen=True)
class Polynomial(Schedule):
    """ε_t = a (b + t)^-γ through ε_0 = ``first_step_size`` and ε_{T-1} = ``last_step_size``.

    JaxSGMC's ``polynomial_step_size_first_last`` (Welling & Teh's decay, with γ in
    (0.5, 1] for their convergence proof; JaxSGMC uses 0.33). With
    ``last_step_size`` None the last step size is ``first_step_size · T^-γ`` (the
    JaxSGMC CIFAR-10 tutorial's choice).
    """

    first_step_size: float
    last_step_size: float | None = None
    gamma: float = 0.33

    def coefficients(self, num_steps: int) -> tuple[float, float]:
        """(a, b) of ε_t = a (b + t)^-γ for a run of ``num_steps`` steps."""
        first, g = self.first_step_size, self.gamma
        last = self.last_step_size if self.last_step_size is not None else first * num_steps**-g
        if num_steps < 2 or first == last:
            return first, 1.0  # with γ applied to b + t this is ~constant; see __call__
        a_pow = (last ** (-1.0 / g) - first ** (-1.0 / g)) / (num_steps - 1)  # a^(-1/γ)
        a = a_pow ** (-g)
        b = (first / a) ** (-1.0 / g)
        return a, b

    def __call__(self, step, num_steps: int):
        last = self.last_step_size
        if num_steps < 2 or (last is not None and last == self.first_step_size):
            return jnp.full(jnp.shape(step), self.first_step_size, jnp.float32)
        a, b = self.coefficients(num_steps)
        return (a * jnp.power(b + jnp.asarray(step, jnp.float32), -self.gamma)).astype(jnp.float32)


@dataclass(frozen=True)
class Cyclical(Schedule):
    """Cyclical step size of cSG-MCMC (Zhang et al., ICLR 2020)::

        ε_t = ε_0 / 2 · (cos(π · r_t) + 1),   r_t = (t mod L) / L,   L = ⌈T / num_cycles⌉

    Each cycle starts at ``step_size`` and decays towards 0. Steps with
    r_t < ``exploration_fraction`` (β) are the exploration stage: the kernel runs at
    temperature 0 (no noise: SGD for SGLD, SGD with momentum for SGHMC with carried
    momentum) and no sample is kept; the rest of the cycle is the sampling stage,
    where samples are kept (``method.members_per_chain`` or ``thinning`` count
    sampling-stage steps only).
    """

    step_size: float
    num_cycles: int = 4
    exploration_fraction: float = 0.9

    def __call__(self, step, num_steps: int):
        return (self.step_size / 2 * (jnp.cos(jnp.pi * self._phase(step, num_steps)) + 1)).astype(
            jnp.float32
        )

    def sampling_stage(self, step, num_steps: int):
        length = math.ceil(num_steps / self.num_cycles)
        # r_t >= β in integers, (t mod L) >= ⌈β L⌉, so that no rounding of r_t moves a
        # step across the boundary (1e-9 absorbs the rounding of β L itself)
        first_sampling = math.ceil(self.exploration_fraction * length - 1e-9)
        return jnp.mod(jnp.asarray(step), length) >= first_sampling

    def _phase(self, step, num_steps: int):
        length = math.ceil(num_steps / self.num_cycles)
        return jnp.mod(jnp.asarray(step, jnp.float32), length) / length


def constant(step_size: float) -> Constant:
    """A constant step size (the BlackJAX tutorials)."""
    _check_positive(step_size=step_size)
    return Constant(float(step_size))


def polynomial(
    step_size: float, last_step_size: float | None = None, gamma: float = 0.33
) -> Polynomial:
    """Polynomial decay from ``step_size`` (JaxSGMC's ``first_step_size``) to
    ``last_step_size``. Every schedule names its first step ``step_size``, so a config
    can switch schedules by overriding ``_target_`` alone."""
    first_step_size = step_size
    _check_positive(step_size=first_step_size, gamma=gamma)
    if last_step_size is not None:
        _check_positive(last_step_size=last_step_size)
        if last_step_size > first_step_size:
            raise UserError(
                "method.step_size.last_step_size must not exceed step_size "
                f"({last_step_size} > {first_step_size})."
            )
    return Polynomial(
        float(first_step_size),
        None if last_step_size is None else float(last_step_size),
        float(gamma),
    )


def cyclical(step_size: float, num_cycles: int = 4, exploration_fraction: float = 0.9) -> Cyclical:
    """Cosine cycles of the step size, each an exploration then a sampling stage (cSG-MCMC).

    ``exploration_fraction`` β defaults to 0.9, as Zhang et al.'s CIFAR-10 script
    (noise in the last 5 of each 50-epoch cycle); 0 samples over whole cycles.
    """
    _check_positive(step_size=step_size, num_cycles=num_cycles)
    if not 0 <= exploration_fraction < 1:
        raise UserError(
            f"method.step_size.exploration_fraction must be in [0, 1) (the share of each "
            f"cycle run without noise); got {exploration_fraction}."
        )
    return Cyclical(float(step_size), int(num_cycles), float(exploration_fraction))


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not v > 0:
            raise UserError(f"method.step_size.{name} must be > 0; got {v}.")
