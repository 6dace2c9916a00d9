"""A model: a flax module behind a pure ``apply(params, state, x_uint8, train, key)``.

The wrapper owns the input pipeline (``Spec.preprocess``: scale, normalise,
resize on the device), so every method feeds it the uint8 images the dataset
holds, and no method can forget a step of preprocessing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_bench.data import Spec
from bnn_bench.errors import UserError

Params = Any  # a pytree of arrays
State = dict  # non-trainable collections, e.g. {"batch_stats": ...}; {} when none


@dataclass(frozen=True)
class Model:
    """A flax module plus the preprocessing of its inputs.

    Attributes:
      module: the flax ``nn.Module``; ``__call__(x, train)`` returns (B, C) logits.
      spec: the dataset spec (input shape, normalisation, resize).
      name: the config choice (``mlp``, ``cnn``, ...), for logs.
      batch_size: inputs per forward pass when predicting many (``eval.batch_size``).
    """

    module: nn.Module
    spec: Spec
    name: str = ""
    batch_size: int = 1000

    def init(self, key: jax.Array) -> tuple[Params, State]:
        """Initial ``(params, state)``; ``state`` holds batch-norm statistics if any."""
        x = jnp.zeros((1, *self.spec.shape), jnp.uint8)
        variables = self.module.init(
            {"params": key, "dropout": key}, self.spec.preprocess(x), train=False
        )
        variables = dict(variables)
        params = variables.pop("params")
        return params, variables

    def apply(
        self,
        params: Params,
        state: State,
        x: jax.Array,
        train: bool = False,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, State]:
        """Logits (B, C) for uint8 images x (B, H, W, C), and the updated state.

        In training mode batch norm uses batch statistics and returns updated
        running statistics; dropout needs ``key``.
        """
        variables = {"params": params, **state}
        rngs = {"dropout": key} if key is not None else {}
        xs = self.spec.preprocess(x)
        if train and state:
            logits, new_state = self.module.apply(
                variables, xs, train=True, mutable=list(state), rngs=rngs
            )
            return logits, dict(new_state)
        return self.module.apply(variables, xs, train=train, rngs=rngs), state

    def logits(self, params: Params, state: State, x: jax.Array) -> jax.Array:
        """Evaluation-mode logits (N, C) for N inputs, ``batch_size`` at a time. Jittable."""
        return map_batches(lambda xb: self.apply(params, state, xb)[0], x, self.batch_size)

    def probs(self, params: Params, state: State, x: jax.Array) -> jax.Array:
        """Evaluation-mode class probabilities (N, C)."""
        return jax.nn.softmax(self.logits(params, state, x), axis=-1)

    def log_probs(self, params: Params, state: State, x: jax.Array) -> jax.Array:
        """Evaluation-mode class log-probabilities (N, C): what a member gives."""
        return jax.nn.log_softmax(self.logits(params, state, x), axis=-1)

    @property
    def has_batch_norm(self) -> bool:
        _, state = jax.eval_shape(self.init, jax.random.key(0))
        return "batch_stats" in state


@dataclass(frozen=True)
class Trait:
    """A property of a model that some methods need or refuse (``methods.base.Need``).

    Attributes:
      noun: how messages name it ("batch norm").
      of: whether a model has it (computed on shapes, without data).
      with_: how to choose a model that has it (one sentence).
      without: how to choose a model that lacks it (one sentence).
    """

    noun: str
    of: Callable[[Model], bool]
    with_: str
    without: str


def _has_dropout(model: Model) -> bool:
    return any(
        isinstance(c.module, nn.Dropout) and float(c.module.rate) > 0 for c in module_calls(model)
    )


def _has_depthwise(model: Model) -> bool:
    return any(getattr(c.module, "feature_group_count", 1) != 1 for c in module_calls(model))


# The traits methods declare needs on; the one place each trait's refusal is worded.
TRAITS: dict[str, Trait] = {
    "batch_norm": Trait(
        "batch norm",
        lambda model: model.has_batch_norm,
        "Use model=resnet20, model=wrn (WRN-28-10) or model=wrn16_4, model=lenet "
        "model.norm=batchnorm, or model=mobilenet model.use_bn=true.",
        "Choose one without: model=resnet20_frn (ResNet-20 with filter response norm, "
        "the batch-norm-free resnet20), model=mlp or model=cnn, model.norm=none (lenet), "
        "model.use_bn=false (mobilenet).",
    ),
    "dropout": Trait(
        "dropout",
        _has_dropout,
        "Set model.dropout_rate, e.g. model.dropout_rate=0.2 (mlp, cnn, lenet, wrn), or use "
        "model=convmod.",
        "Set model.dropout_rate=0 (mlp, cnn, lenet, wrn, convmod).",
    ),
    "depthwise": Trait(
        "depthwise convolutions",
        _has_depthwise,
        "Use model=mobilenet.",
        "Choose a model without: model=mlp, cnn, lenet, convmod, resnet20_frn, resnet20 or wrn.",
    ),
}


@dataclass(frozen=True)
class Call:
    """One call of a submodule's ``__call__`` in a forward pass.

    Attributes:
      path: the module's path, which is also its keys in ``params``.
      module: the module (read its attributes: ``rate``, ``use_bias``, ...).
      out_shape: the output's shape for one input batch of size 1.
    """

    path: tuple[str, ...]
    module: nn.Module
    out_shape: tuple[int, ...]


def module_calls(model: Model) -> list[Call]:
    """Every submodule ``__call__`` of one evaluation-mode forward pass of ``model``, in
    call order (a flax method interceptor under ``jax.eval_shape``: no compute).

    How methods find their layers without knowing the model: the last layer (Laplace),
    the dropout layers (MC dropout, VI), the dense and convolution layers (VI, KFAC).
    """
    calls: list[Call] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path:
            shape = tuple(out.shape) if hasattr(out, "shape") else ()
            calls.append(Call(tuple(context.module.path), context.module, shape))
        return out

    def forward(key):
        params, state = model.init(key)
        with nn.intercept_methods(record):
            return model.apply(params, state, jnp.zeros((1, *model.spec.shape), jnp.uint8))[0]

    jax.eval_shape(forward, jax.random.key(0))
    return calls


def map_batches(fn: Callable[[jax.Array], Any], x: jax.Array, batch_size: int) -> Any:
    """``fn`` over x (N, ...) in batches of ``batch_size`` inputs (``lax.map``; the last
    batch zero-padded), every output leaf (b, ...) joined to (N, ...). Jittable.

    The one batched forward pass: ``Model.logits`` and Laplace's predictives use it.
    """
    n = x.shape[0]
    b = max(1, min(batch_size, n))
    pad = (-n) % b
    xb = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(-1, b, *x.shape[1:])
    out = jax.lax.map(fn, xb)  # leaves (nb, b, ...)
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:n], out)


def num_params(params: Params) -> int:
    """Number of scalar parameters in a pytree."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def build_model(module: nn.Module, spec: Spec, name: str = "", batch_size: int = 1000) -> Model:
    """Wraps ``module`` and checks, without computing, that it takes the data's inputs.

    Raises:
      UserError: when the (resized) input shape does not fit the network, naming
        the shape and what to change.
    """
    model = Model(module, spec, name, batch_size)
    x = jnp.zeros((2, *spec.shape), jnp.uint8)

    def probe(key):
        params, state = model.init(key)
        # Every layer's output shape: a VALID conv on too small an input yields
        # an empty feature map, which flax does not reject by itself.
        out, inter = module.apply(
            {"params": params, **state},
            spec.preprocess(x),
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        return out, inter

    try:
        out, inter = jax.eval_shape(probe, jax.random.key(0))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is the input shape's
        if isinstance(e, ValueError) and "model." in str(e):
            raise UserError(str(e)) from e
        raise _shape_error(model, e) from e
    empty = [a.shape for a in jax.tree.leaves(inter) if 0 in a.shape]
    if empty:
        raise _shape_error(model, ValueError(f"a layer's output would be empty {empty[0]}"))
    if out.shape != (2, spec.num_classes):
        raise UserError(
            f"model {name} gives outputs of shape {out.shape[1:]} for "
            f"{spec.num_classes} classes; set its num_classes to the dataset's."
        )
    return model


def _shape_error(model: Model, e: Exception) -> UserError:
    spec = model.spec
    resize = f" (dataset.resize={list(spec.resize)})" if spec.resize else ""
    return UserError(
        f"model {model.name or type(model.module).__name__} cannot take {spec.name} inputs of "
        f"shape {spec.input_shape}{resize}: {str(e).splitlines()[0][:300]}. "
        f"Choose a larger dataset.resize or another model."
    )
