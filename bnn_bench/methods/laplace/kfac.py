"""Kronecker factors of the GGN for every dense and convolution layer of a flax model.

For a dense layer s = Wᵀ ã (ã = [a; 1] with a bias), the GGN block of one input is
exactly a Kronecker product (Martens & Grosse, 2015):

    J_Wᵀ Λ J_W = ã ãᵀ ⊗ Σ_k g_k g_kᵀ,   g_k = (∂f/∂s)ᵀ L_k,   Λ = L Lᵀ

(Λ the likelihood's Fisher at the outputs, L its factor from ``curvature.GGN.factor``:
the exact output Hessian of softmax cross-entropy, or 1/σ² on a Gaussian's mean and 2
on its log σ, not a Fisher from sampled labels). KFAC sums the two factors over inputs
separately:

    G_W ≈ (1/n Σ_n ã_n ã_nᵀ) ⊗ (Σ_n Σ_k g_nk g_nkᵀ).

With the bias in ã the block is one joint (D_in + 1) x (D_in + 1) input factor, exact for
one input (the default). laplace-torch instead gives the weight and the bias blocks of
their own, A_w ⊗ B and B (``kronecker(separate_bias=True)``), which drops the weight-bias
terms that the joint block keeps.

A convolution is a dense layer applied at T output positions to the patches under its
kernel; KFC (Grosse & Martens, 2016) in its "expand" form (Eschenhagen et al., 2023)
treats the n·T (patch, output-gradient) pairs as the examples: A = 1/(nT) Σ ã ãᵀ,
B = Σ g gᵀ.

The layers are found and fed by a flax method interceptor, so every project model
works unchanged: it records each ``nn.Dense``, ``nn.Conv`` and ``layers.Conv`` call's
input (a convolution's patches come from the same layer with an identity kernel, so
padding and strides are the layer's own) and adds a zero perturbation to its output,
whose cotangent is g. Written by hand: kfac-jax computes the same factors, but inside
its optimiser's curvature estimator (registered layers and loss, exponential moving
averages, damping), not as summed factors of a fixed network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from bnn_bench.errors import UserError
from bnn_bench.methods.laplace import curvature as cv
from bnn_bench.methods.laplace.gaussian import Kronecker, KroneckerBlock
from bnn_bench.models import Model, module_calls
from bnn_bench.models import layers as L

LAYERS = (nn.Dense, nn.Conv, L.Conv)


@dataclass(frozen=True)
class Layer:
    """A dense or convolution layer the factors cover.

    Attributes:
      path: its module path = its keys in ``params``.
      bias: whether it has a bias.
      kind: ``Dense`` or ``Conv``.
      out_shape: its output's shape for one input, (..., D_out).
    """

    path: tuple[str, ...]
    bias: bool
    kind: str
    out_shape: tuple[int, ...]

    @property
    def positions(self) -> int:
        """T, the positions it is applied at per input (1 for a dense layer on flat
        inputs, the output pixels of a convolution)."""
        return math.prod(self.out_shape[:-1])


def _features(module: nn.Module, x: jax.Array) -> jax.Array:
    """(B, T, D_in') the inputs of the layer's matrix: a dense layer's input (T = the
    product of its middle axes), or a convolution's patches (T = output positions);
    with a ones column for the bias."""
    if isinstance(module, nn.Dense):
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        kh, kw = module.kernel_size
        d = kh * kw * x.shape[-1]
        eye = jnp.eye(d, dtype=x.dtype).reshape(kh, kw, x.shape[-1], d)
        patches = module.clone(parent=None, features=d, use_bias=False).apply(
            {"params": {"kernel": eye}}, x
        )  # (B, h, w, kh*kw*C_in) in the kernel's (i, j, c) order
        a = patches.reshape(x.shape[0], -1, d)
    if module.use_bias:
        a = jnp.concatenate([a, jnp.ones((*a.shape[:2], 1), a.dtype)], -1)
    return a


def _forward(logits_fn: Callable[[], jax.Array], perturb: dict[tuple[str, ...], jax.Array]):
    """Runs ``logits_fn`` with the layers of ``perturb`` {path: (B, ..., D_out)}
    intercepted: each adds its perturbation to its output and records its features.
    Returns the logits and the features {path: (B, T, D_in')}."""
    feats = {}
    busy = []  # set while a convolution's patches are cut (by a call of the same layer)

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        if busy or context.method_name != "__call__" or path not in perturb:
            return out
        busy.append(path)
        feats[path] = _features(context.module, args[0])
        busy.pop()
        return out + perturb[path]

    with nn.intercept_methods(intercept):
        logits = logits_fn()
    return logits, feats


def find_layers(model: Model, head: str | None) -> tuple[Layer, ...]:
    """The layers the factors cover, in call order (traced, no compute, so it can run
    before training). Refuses parameters outside them, weights shared between calls and
    grouped convolutions, naming what to use instead.

    ``head``: only that top-level layer (the last-layer subset), else all of them.
    """
    prefix = (head,) if head is not None else ()
    layers: dict[tuple[str, ...], Layer] = {}
    for call in module_calls(model):
        if not isinstance(call.module, LAYERS) or call.path[: len(prefix)] != prefix:
            continue
        name = "/".join(call.path)
        if call.path in layers:
            raise UserError(
                f"Layer {name} is called twice in one forward pass (shared weights), which "
                "one Kronecker block per layer (method/laplace/structure=kfac) cannot "
                "describe; use method/laplace/structure=diagonal or lanczos."
            )
        if getattr(call.module, "feature_group_count", 1) != 1:
            raise UserError(
                f"Layer {name} is a grouped (depthwise) convolution, which has no single "
                "Kronecker block (method/laplace/structure=kfac); use "
                "method.structure.subset=last_layer or method/laplace/structure=diagonal."
            )
        kind = "Dense" if isinstance(call.module, nn.Dense) else "Conv"
        bias = bool(call.module.use_bias)
        layers[call.path] = Layer(call.path, bias, kind, call.out_shape[1:])
    params, _ = jax.eval_shape(model.init, jax.random.key(0))
    tree = params[head] if head is not None else params
    covered = {(*path, name) for path in layers for name in ("kernel", "bias")}
    rest = [
        "/".join((*prefix, *k))
        for k in traverse_util.flatten_dict(tree)
        if (*prefix, *k) not in covered
    ]
    if rest:
        raise UserError(
            f"method/laplace/structure=kfac covers dense and convolution layers only; model "
            f"{model.name or type(model.module).__name__} has other parameters "
            f"({', '.join(rest[:4])}{', ...' if len(rest) > 4 else ''}). Use "
            "method.structure.subset=last_layer (KFAC over the last layer), or "
            "method/laplace/structure=diagonal or lanczos."
        )
    return tuple(layers.values())


def batch_factors(
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
    theta: jax.Array,
    x: jax.Array,
    y: jax.Array,
    weights: jax.Array,
    layers: tuple[Layer, ...],
    kind: cv.LossCurvature,
    likelihood: cv.Likelihood = cv.CATEGORICAL,
) -> dict[tuple[str, ...], tuple[jax.Array, jax.Array]]:
    """Unnormalised factors of one batch: {path: (Σ w ã ãᵀ (D_in', D_in'), Σ w g gᵀ
    (D_out, D_out))}, sums over the batch's inputs (weights: (B,), 0 masks padding),
    their T positions and the K columns of the loss factor L.

    Args:
      logits_fn: (theta, x) -> outputs (B, K), the network with ``theta`` set.
      layers: the covered layers (``find_layers``).
      kind, likelihood: the loss curvature and the likelihood it is of.
    """
    zeros = {c.path: jnp.zeros((x.shape[0], *c.out_shape), jnp.float32) for c in layers}

    def f(perturb):
        return _forward(lambda: logits_fn(theta, x), perturb)

    logits, vjp_fn, feats = jax.vjp(f, zeros, has_aux=True)
    lf = kind.factor(logits, y, likelihood)  # (B, K, R)
    grads = jax.vmap(lambda col: vjp_fn(col)[0])(jnp.moveaxis(lf, -1, 0))  # {p: (R, B, ..., D)}
    sw = jnp.sqrt(weights)
    out = {}
    for path, a in feats.items():
        a = a * sw[:, None, None]
        g = grads[path]
        g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]) * sw[None, :, None, None]
        out[path] = (jnp.einsum("bti,btj->ij", a, a), jnp.einsum("kbti,kbtj->ij", g, g))
    return out


def kronecker(
    sums: dict[tuple[str, ...], tuple[jax.Array, jax.Array]],
    layers: tuple[Layer, ...],
    prefix: tuple[str, ...],
    examples: float,
    scale: float,
    unravel: Callable,
    separate_bias: bool = False,
) -> Kronecker:
    """The eigendecomposed ``Kronecker`` curvature from summed factors: A = ΣA/(n T),
    B = scale · ΣB, so that A ⊗ B ≈ scale · Σ_n J_nᵀ H_n J_n (scale = N / n rescales
    the n curvature examples to the training set).

    ``separate_bias``: a layer with a bias gets two blocks, A_w ⊗ B for the weight (A_w:
    A without its ones row and column) and B for the bias (A's ones entry, 1), dropping
    the weight-bias terms of the joint block. This is laplace-torch's KFAC (its
    curvlinops backend's ``separate_weight_and_bias=True``: ``[B, A]`` and ``[B]``;
    its ASDL backend's ``B · A[-1, -1] / M``, the same B).
    """
    qa, a, qb, b, blocks = [], [], [], [], []
    for layer in layers:
        sa, sb = sums[layer.path]
        big_a = sa / (examples * layer.positions)
        eb, vb = jnp.linalg.eigh(scale * sb)
        path = layer.path[len(prefix) :]
        if layer.bias and separate_bias:
            parts = [(big_a[:-1, :-1], ("kernel",)), (jnp.ones((1, 1), sa.dtype), ("bias",))]
        else:
            parts = [(big_a, ("kernel", "bias") if layer.bias else ("kernel",))]
        for factor, params in parts:
            ea, va = jnp.linalg.eigh(factor)
            qa.append(va)
            a.append(jnp.maximum(ea, 0.0))
            qb.append(vb)
            b.append(jnp.maximum(eb, 0.0))
            blocks.append(KroneckerBlock(path, params))
    return Kronecker(tuple(qa), tuple(a), tuple(qb), tuple(b), tuple(blocks), unravel)
