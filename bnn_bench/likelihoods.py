"""Likelihoods: how a network's outputs ``out`` (B, K) score the targets ``y`` (B,).

The ``likelihood`` config group. Every log density (SG-MCMC, HMC, VI), training loss
(MAP, ensembles, SWAG, MC dropout), curvature (Laplace's GGN ``Jᵀ Λ J`` with
``Λ = fisher(out)``) and member (what evaluation receives) goes through one object:

- ``Categorical()``: classification; out are logits (B, C), y integer labels;
  ``p(y | out) = softmax(out)[y]``. A member is the log-softmax (B, C).
- ``Gaussian(noise, sigma)``: regression; y float targets in standardised units;
  ``p(y | out) = N(y; μ, σ²)``. A member is (B, 2) = (μ, log σ). ``noise``:

  * ``fixed``: σ = ``sigma``; the net has 1 output, μ.
  * ``learned``: one homoscedastic log σ, a parameter ``log_noise`` of the params pytree
    (``LearnedNoise`` wraps the net; initialised at log ``sigma``), so samplers, VI and
    Laplace treat it like any other weight. The wrapped net outputs (μ, log σ).
  * ``heteroscedastic``: the net has 2 outputs, μ and a log-σ head;
    log σ = head + log ``sigma`` (``sigma`` is σ where the head gives 0, e.g. at
    initialisation), as the mean-variance networks of Nix & Weigend (1994) and deep
    ensembles (Lakshminarayanan et al., 2017).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnn_bench.errors import UserError
from bnn_bench.evaluation import metrics as M
from bnn_bench.schema import Positive

TASKS = ("classification", "regression")
NOISES = ("fixed", "learned", "heteroscedastic")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Likelihood(abc.ABC):
    """What every method needs of a likelihood.

    Attributes:
      task: ``classification`` or ``regression``: the datasets it fits (``Spec.task``).
      name: its ``likelihood=`` choice, for messages.
      score_name: what ``score`` measures, for training logs (``acc`` or ``rmse``).
    """

    task: ClassVar[str]
    name: ClassVar[str]
    score_name: ClassVar[str]

    @abc.abstractmethod
    def outputs(self, num_targets: int) -> int:
        """Units of the network's last layer for ``num_targets`` classes or targets."""

    def wrap(self, module: nn.Module) -> nn.Module:
        """The network the methods see: ``module`` itself, unless the likelihood adds
        parameters of its own (``Gaussian(noise="learned")``'s ``log_noise``)."""
        return module

    @abc.abstractmethod
    def log_lik(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """Per-example log-likelihood (B,) of outputs out (B, K) at targets y (B,)."""

    def loss(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """The training loss: the mean negative log-likelihood over the batch, ()."""
        return -jnp.mean(self.log_lik(out, y))

    @abc.abstractmethod
    def member_width(self, num_targets: int) -> int:
        """M, the width of ``member``'s (B, M): C classes, or 2 (μ, log σ)."""

    @abc.abstractmethod
    def member(self, out: jax.Array) -> jax.Array:
        """What one member gives evaluation for outputs out (B, K): (B, M) (leading axes
        kept: (..., K) -> (..., M))."""

    @abc.abstractmethod
    def member_nll(self, members, y, xp=np):
        """Mean NLL of targets y (N,) under members (..., N, M) (``member``'s), every
        member a point estimate; leading axes averaged too. ``xp``: numpy (float64 on the
        host, returns a float) or jax.numpy (traceable)."""

    @abc.abstractmethod
    def member_score(self, members: jax.Array, y: jax.Array) -> jax.Array:
        """``score`` of members (..., N, M) at targets y (N,), over every member, ()."""

    @abc.abstractmethod
    def fisher(self, out: jax.Array) -> jax.Array:
        """Per-example curvature of -log_lik w.r.t. out, (B, K, K): the expected Hessian
        under the model's own predictive (the Fisher; the GGN's Λ)."""

    def fisher_factor(self, out: jax.Array) -> jax.Array:
        """L (B, K, K) with L Lᵀ = ``fisher(out)``: its symmetric square root (the GGN's
        loss factor, which the Kronecker factors and the Jacobian passes use)."""
        evals, evecs = jnp.linalg.eigh(self.fisher(out))  # (B, K), (B, K, K)
        return evecs * jnp.sqrt(jnp.maximum(evals, 0.0))[:, None, :]

    def fisher_product(self, out: jax.Array, v: jax.Array) -> jax.Array:
        """``fisher(out) v`` per example, (B, K) for v (B, K)."""
        return jnp.einsum("bij,bj->bi", self.fisher(out), v)

    def residual(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """r (B, K) = −∂ log p(y | out)/∂out per example (the empirical Fisher's r rᵀ)."""
        return -jax.grad(lambda f: jnp.sum(self.log_lik(f, y)))(out)

    @abc.abstractmethod
    def score(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """The training log's fit of one network, (): accuracy, or the RMSE in
        standardised units."""

    @abc.abstractmethod
    def mixture(self, outs: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(NLL, score) of the equal-weight mixture of K networks' outputs outs (K, B, K'):
        the validation line of an ensemble's training."""

    @abc.abstractmethod
    def guess_nll(self, num_targets: int) -> float:
        """The NLL per example of an uninformed guess (the scale of the divergence check's
        loss bound, ``loop.Divergence``)."""

    def check_task(self, task: str) -> None:
        """Refuses a dataset of another task, naming the ``likelihood=`` to choose.

        Raises:
          UserError: the dataset's task is not this likelihood's.
        """
        if task != self.task:
            fit = "categorical" if task == "classification" else "gaussian"
            raise UserError(
                f"likelihood={self.name} is for {self.task}, and the dataset is a "
                f"{task} dataset; choose likelihood={fit}."
            )


@dataclass(frozen=True)
class Categorical(Likelihood):
    """The softmax likelihood of classification: ``p(y | out) = softmax(out)[y]``."""

    task: ClassVar[str] = "classification"
    name: ClassVar[str] = "categorical"
    score_name: ClassVar[str] = "acc"

    def outputs(self, num_targets: int) -> int:
        """One logit per class."""
        return num_targets

    def log_lik(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """``log softmax(out)[y]``, (B,)."""
        return jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=-1)[:, 0]

    def loss(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """Mean softmax cross-entropy (optax's, whose gradient the trainer has always used)."""
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    def member_width(self, num_targets: int) -> int:
        """C: one log-probability per class."""
        return num_targets

    def member(self, out: jax.Array) -> jax.Array:
        """Class log-probabilities (B, C): the log-softmax of the logits."""
        return jax.nn.log_softmax(out, axis=-1)

    def member_nll(self, members, y, xp=np):
        """Exact, from the log-probabilities (``metrics.nll_of_log_probs``)."""
        return M.nll_of_log_probs(members, y, xp=xp)

    def member_score(self, members: jax.Array, y: jax.Array) -> jax.Array:
        """Accuracy of the argmax over every member and input."""
        return jnp.mean(members.argmax(-1) == y)

    def fisher(self, out: jax.Array) -> jax.Array:
        """``diag(p) - p pᵀ`` (B, C, C), p = softmax(out): the softmax cross-entropy's
        Hessian, which does not depend on y."""
        p = jax.nn.softmax(out, axis=-1)
        return jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]

    def fisher_factor(self, out: jax.Array) -> jax.Array:
        """``diag(√p) − p √pᵀ`` (B, C, C), in closed form: L Lᵀ = diag(p) − p pᵀ because
        Σ p = 1."""
        p = jax.nn.softmax(out, axis=-1)
        sq = jnp.sqrt(p)
        return jax.vmap(jnp.diag)(sq) - p[:, :, None] * sq[:, None, :]

    def fisher_product(self, out: jax.Array, v: jax.Array) -> jax.Array:
        """``p ⊙ v − p (pᵀ v)`` (B, C), without forming the C x C matrix."""
        p = jax.nn.softmax(out, axis=-1)
        return p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)

    def residual(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """``p − onehot(y)`` (B, C), in closed form."""
        p = jax.nn.softmax(out, axis=-1)
        return p - jax.nn.one_hot(y, out.shape[-1], dtype=p.dtype)

    def score(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """Accuracy of the argmax, ()."""
        return jnp.mean(jnp.argmax(out, -1) == y)

    def guess_nll(self, num_targets: int) -> float:
        """log C: a uniform guess's NLL (C at least 2)."""
        return math.log(max(num_targets, 2))

    def mixture(self, outs: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """NLL (probabilities clipped as ``metrics.nll``) and accuracy of the mean of the
        networks' probabilities."""
        probs = jax.nn.softmax(outs, axis=-1).mean(0)
        return M.nll(probs, y, xp=jnp), jnp.mean(probs.argmax(-1) == y)


@dataclass(frozen=True)
class Gaussian(Likelihood):
    """``p(y | out) = N(y; μ, σ²)`` in standardised target units.

    Attributes:
      noise: ``fixed`` (σ = sigma), ``learned`` (one log σ parameter, ``log_noise``,
        initialised at log sigma) or ``heteroscedastic`` (a log-σ head: log σ = head +
        log sigma).
      sigma: σ of fixed noise; σ at initialisation for learned and heteroscedastic noise.
    """

    noise: Literal["fixed", "learned", "heteroscedastic"] = "fixed"
    sigma: Annotated[float, Positive] = 1.0

    task: ClassVar[str] = "regression"
    name: ClassVar[str] = "gaussian"
    score_name: ClassVar[str] = "rmse"

    def __post_init__(self):
        if self.noise not in NOISES:
            raise UserError(
                f"likelihood.noise must be one of {', '.join(NOISES)}; got {self.noise!r}."
            )
        if not self.sigma > 0:
            raise UserError(f"likelihood.sigma must be > 0, got {self.sigma!r}.")

    def outputs(self, num_targets: int) -> int:
        """μ per target, and a log-σ head with heteroscedastic noise (one target only)."""
        if num_targets != 1:
            raise UserError(
                f"likelihood=gaussian takes one target per example; the dataset has "
                f"{num_targets}. Choose a dataset with one target."
            )
        return 2 if self.noise == "heteroscedastic" else 1

    def wrap(self, module: nn.Module) -> nn.Module:
        """With learned noise, ``module`` inside ``LearnedNoise`` (adds ``log_noise``)."""
        if self.noise == "learned":
            return LearnedNoise(module, math.log(self.sigma))
        return module

    def mean_log_sigma(self, out: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(μ (B,), log σ (B,)) of outputs out (B, K) (any leading axes: (..., K))."""
        mean = out[..., 0]
        if self.noise == "fixed":
            return mean, jnp.full_like(mean, math.log(self.sigma))
        if self.noise == "learned":  # LearnedNoise's second column is log_noise itself
            return mean, out[..., 1]
        return mean, out[..., 1] + math.log(self.sigma)

    def log_lik(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """``-½ log 2π - log σ - (y - μ)² / (2σ²)``, (B,)."""
        mean, log_sigma = self.mean_log_sigma(out)
        z = (y - mean) * jnp.exp(-log_sigma)
        return -_HALF_LOG_2PI - log_sigma - 0.5 * jnp.square(z)

    def member_width(self, num_targets: int) -> int:
        """2: μ and log σ."""
        del num_targets
        return 2

    def member(self, out: jax.Array) -> jax.Array:
        """(B, 2): μ and log σ, standardised units."""
        return jnp.stack(self.mean_log_sigma(out), axis=-1)

    def member_nll(self, members, y, xp=np):
        """``-mean log N(y; μ, σ²)`` over members (..., N, 2) = (μ, log σ)."""
        if xp is np:
            members, y = np.asarray(members, np.float64), np.asarray(y, np.float64)
        z = (y - members[..., 0]) * xp.exp(-members[..., 1])
        out = xp.mean(_HALF_LOG_2PI + members[..., 1] + 0.5 * xp.square(z))
        return float(out) if xp is np else out

    def member_score(self, members: jax.Array, y: jax.Array) -> jax.Array:
        """RMSE of every member's μ, standardised units."""
        return jnp.sqrt(jnp.mean(jnp.square(members[..., 0] - y)))

    def point_metrics(self, members, y, scale: float = 1.0) -> dict[str, float]:
        """``rmse`` and ``nll`` of one member (N, 2) at standardised targets y (N,), in the
        target's original units (``scale``: its std; NLL + log scale), float64 on the host."""
        members, y = np.asarray(members, np.float64), np.asarray(y, np.float64)
        return {
            "rmse": float(np.sqrt(np.mean(np.square(members[:, 0] - y))) * scale),
            "nll": self.member_nll(members, y) + math.log(scale),
        }

    def fisher(self, out: jax.Array) -> jax.Array:
        """``1/σ²`` on μ, (B, 1, 1) for fixed noise; ``diag(1/σ², 2)`` on (μ, log σ),
        (B, 2, 2), where log σ is an output (learned, heteroscedastic)."""
        _, log_sigma = self.mean_log_sigma(out)
        precision = jnp.exp(-2 * log_sigma)
        if self.noise == "fixed":
            return precision[:, None, None]
        zero = jnp.zeros_like(precision)
        two = jnp.full_like(precision, 2.0)
        return jnp.stack([jnp.stack([precision, zero], -1), jnp.stack([zero, two], -1)], axis=-2)

    def score(self, out: jax.Array, y: jax.Array) -> jax.Array:
        """RMSE of μ, standardised units."""
        return jnp.sqrt(jnp.mean(jnp.square(out[..., 0] - y)))

    def guess_nll(self, num_targets: int) -> float:
        """The NLL of N(0, sigma²) on standardised targets (variance 1):
        ½ log 2π + log sigma + 1 / (2 sigma²), at least ½ log 2π + ½ (sigma = 1)."""
        del num_targets
        return _HALF_LOG_2PI + math.log(self.sigma) + 0.5 / self.sigma**2

    def mixture(self, outs: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """NLL of the Gaussian mixture ``(1/K) Σ_k N(y; μ_k, σ_k²)`` and the RMSE of its
        mean, standardised units."""
        k = outs.shape[0]
        log_liks = jax.vmap(lambda o: self.log_lik(o, y))(outs)  # (K, B)
        nll = -jnp.mean(jax.nn.logsumexp(log_liks, axis=0) - math.log(k))
        mean = outs[..., 0].mean(0)
        return nll, jnp.sqrt(jnp.mean(jnp.square(mean - y)))


CATEGORICAL = Categorical()  # the default of a model built without a likelihood


class LearnedNoise(nn.Module):
    """A regression net with one learned homoscedastic noise: ``(μ, log σ)`` per input,
    log σ the parameter ``log_noise`` (params ``{"net": ..., "log_noise": ()}``).

    Attributes:
      net: the network giving μ (B, 1).
      init_log_sigma: log σ at initialisation.
    """

    net: nn.Module
    init_log_sigma: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        mean = self.net(x, train=train)  # (B, 1)
        log_noise = self.param("log_noise", nn.initializers.constant(self.init_log_sigma), ())
        return jnp.concatenate([mean, jnp.broadcast_to(log_noise, mean.shape)], axis=-1)


def task_of(spec) -> str:
    """The dataset's task (``Spec.task``; a spec without one is a classification's)."""
    return getattr(spec, "task", "classification")


def target_scale(spec) -> float:
    """The std of a regression dataset's targets (``Spec.target_std``; 1 without one):
    standardised units times it are the target's original units."""
    return float(getattr(spec, "target_std", 1.0))
