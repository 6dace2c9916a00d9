"""KFAC Laplace (``method/laplace/structure=kfac``, ``method=laplace_kfac``) against dense
references: the exact GGN of one input, and the Kronecker-factored matrix written out
in numpy from a hand-written forward and backward pass of a tiny two-layer MLP."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from bnn_bench.config import build
from bnn_bench.errors import UserError
from bnn_bench.methods.laplace import KFAC, LaplacePosterior
from bnn_bench.methods.laplace import curvature as cv
from bnn_bench.methods.laplace import gaussian as gs
from bnn_bench.models import Model, build_model
from bnn_bench.models.layers import Conv
from bnn_bench.run import run
from tests.conftest import TINY, compose_cfg
from tests.methods.test_laplace import SMALL, _fit

pytestmark = pytest.mark.e2e

KFAC_SMALL = [*SMALL, "method/laplace/structure=kfac", "method.curvature_batches=null"]


def _data_and_model(*overrides):
    cfg = compose_cfg(*SMALL, *overrides)
    data = build(cfg.dataset, "dataset").load()
    module = build(cfg.model, "model", num_classes=data.spec.num_classes)
    return data, build_model(module, data.spec, "mlp", cfg.eval.batch_size)


def _posterior(model: Model, head: str | None = None) -> LaplacePosterior:
    """A posterior at the model's initialisation (the factors need no trained network)."""
    params, state = model.init(jax.random.key(4))
    return LaplacePosterior.at_map(model, params, state, head)


def _exact_ggn(post: LaplacePosterior, x, y) -> np.ndarray:
    """Σ_i J_iᵀ H_i J_i (float64), J from jax.jacfwd, H from jax.hessian of the loss."""
    f = lambda t: post.logits_fn(t, x)
    jac = np.asarray(jax.jacfwd(f)(post.theta), np.float64)  # (N, C, P)
    hess = jax.vmap(jax.hessian(optax.softmax_cross_entropy_with_integer_labels))(f(post.theta), y)
    return np.einsum("ncp,ncd,ndq->pq", jac, np.asarray(hess, np.float64), jac)


def _fit_structure(structure: KFAC, post: LaplacePosterior, split, rows):
    idx = jnp.asarray(rows)[None]  # one batch
    return structure.fit(jax.random.key(0), post, split, idx, jnp.ones(idx.shape), 1.0, cv.GGN())


def _blocks(post: LaplacePosterior) -> list[np.ndarray]:
    """Each top-level layer's indices in the flat vector."""
    tree = post.unravel(jnp.arange(post.theta.shape[0], dtype=jnp.float32))
    return [np.asarray(ravel_pytree(tree[k])[0], int) for k in sorted(tree)]


def test_one_input_one_dense_layer_is_the_exact_ggn():
    data, model = _data_and_model("model.hidden=[]")  # logits = Dense(x): one layer
    post = _posterior(model)
    curv = _fit_structure(KFAC(), post, data.train, [5])
    ref = _exact_ggn(post, data.train.x[5:6], data.train.y[5:6])
    got = np.asarray(curv.dense(), np.float64)
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
    assert np.abs(ref).max() > 1e-3


def test_one_input_gives_the_exact_ggn_blocks_of_each_layer():
    """With one input every layer's block is exact; KFAC drops the blocks between layers."""
    data, model = _data_and_model()  # 36 -> 3 -> 3
    post = _posterior(model)
    curv = _fit_structure(KFAC(), post, data.train, [7])
    ref = _exact_ggn(post, data.train.x[7:8], data.train.y[7:8])
    got = np.asarray(curv.dense(), np.float64)
    (b0, b1) = _blocks(post)
    scale = np.abs(ref).max()
    for b in (b0, b1):
        np.testing.assert_allclose(got[np.ix_(b, b)], ref[np.ix_(b, b)], atol=1e-5 * scale)
    np.testing.assert_allclose(got[np.ix_(b0, b1)], 0.0)
    assert np.abs(ref[np.ix_(b0, b1)]).max() > 1e-4 * scale  # the exact GGN has them


def test_last_layer_subset_with_one_input_is_the_exact_last_layer_block():
    data, model = _data_and_model()
    post = _posterior(model, head="Dense_1")
    curv = _fit_structure(KFAC(subset="last_layer"), post, data.train, [3])
    assert KFAC(subset="last_layer").head(model) == "Dense_1"
    ref = _exact_ggn(post, data.train.x[3:4], data.train.y[3:4])
    np.testing.assert_allclose(
        np.asarray(curv.dense(), np.float64), ref, atol=1e-5 * np.abs(ref).max()
    )


class _ConvNet(nn.Module):
    """A convolution (bias) and a dense head; ``kernel`` = image size gives one position."""

    kernel: int
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.relu(Conv(4, (self.kernel, self.kernel), padding="VALID")(x))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def test_a_convolution_at_one_position_is_the_exact_ggn_block():
    """A 6x6 kernel on a 6x6 image is a dense layer on the flattened patch: exact, which
    pins the patches' (i, j, c) order against the kernel's layout."""
    data, _ = _data_and_model()
    model = build_model(_ConvNet(kernel=6), data.spec, "conv")
    post = _posterior(model)
    curv = _fit_structure(KFAC(), post, data.train, [2])
    ref = _exact_ggn(post, data.train.x[2:3], data.train.y[2:3])
    got = np.asarray(curv.dense(), np.float64)
    scale = np.abs(ref).max()
    for b in _blocks(post):
        np.testing.assert_allclose(got[np.ix_(b, b)], ref[np.ix_(b, b)], atol=1e-5 * scale)


def test_a_convolution_input_factor_is_the_mean_patch_outer_product():
    """KFC's A = 1/(n T) Σ_{n,t} [patch; 1][patch; 1]ᵀ, patches cut out in numpy."""
    data, _ = _data_and_model()
    model = build_model(_ConvNet(kernel=3), data.spec, "conv")
    post = _posterior(model)
    rows = [0, 1, 2]
    curv = _fit_structure(KFAC(), post, data.train, rows)
    x = np.asarray(model.spec.preprocess(data.train.x[np.array(rows)]), np.float64)  # (3, 6, 6, 1)
    patches = [
        np.append(x[n, i : i + 3, j : j + 3, :].reshape(-1), 1.0)
        for n in range(3)
        for i in range(4)
        for j in range(4)
    ]
    ref = np.mean([np.outer(p, p) for p in patches], 0)
    qa, a = np.asarray(curv.qa[0], np.float64), np.asarray(curv.a[0], np.float64)
    np.testing.assert_allclose((qa * a) @ qa.T, ref, atol=1e-5 * np.abs(ref).max())


def _kron_by_hand(post: LaplacePosterior, x, y, separate_bias: bool = False) -> np.ndarray:
    """The KFAC matrix of a 2-layer ReLU MLP, forward and backward written out in numpy,
    in the flat parameter order of ``post.theta``.

    Joint: one block (A ⊗ B) per layer, A over [input; 1]. Separate (laplace-torch's
    curvlinops backend): the weight block A_w ⊗ B, A_w = mean of a aᵀ over the inputs
    alone, and the bias block B, the summed output-gradient outer products.
    """
    p = post.params
    w1, b1 = np.asarray(p["Dense_0"]["kernel"], np.float64), np.asarray(p["Dense_0"]["bias"])
    w2, b2 = np.asarray(p["Dense_1"]["kernel"], np.float64), np.asarray(p["Dense_1"]["bias"])
    h0 = np.asarray(post.model.spec.preprocess(x), np.float64).reshape(len(x), -1)
    pre = h0 @ w1 + b1
    h1 = np.maximum(pre, 0)
    f = h1 @ w2 + b2
    prob = np.exp(f - f.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    n = len(x)
    a_in = [h0, h1]
    g_out = [[], []]
    for i in range(n):
        lf = np.diag(np.sqrt(prob[i])) - np.outer(prob[i], np.sqrt(prob[i]))  # L Lᵀ = H
        for k in range(lf.shape[1]):
            g2 = lf[:, k]
            g_out[1].append(g2)
            g_out[0].append((w2 @ g2) * (pre[i] > 0))
    # each layer's matrix W' (D_in + 1, D_out), its bias the last row, at flat positions
    trees, start, blocks = {}, 0, []
    for layer, (name, w) in enumerate((("Dense_0", w1), ("Dense_1", w2))):
        din, dout = w.shape
        pos = np.arange(start, start + (din + 1) * dout).reshape(din + 1, dout)
        trees[name] = {"kernel": pos[:-1], "bias": pos[-1]}
        start += (din + 1) * dout
        big_b = np.sum([np.outer(g, g) for g in g_out[layer]], 0)
        if separate_bias:
            big_a = a_in[layer].T @ a_in[layer] / n
            blocks += [(pos[:-1].ravel(), np.kron(big_a, big_b)), (pos[-1], big_b)]
        else:
            aa = np.concatenate([a_in[layer], np.ones((n, 1))], 1)
            blocks.append((pos.ravel(), np.kron(aa.T @ aa / n, big_b)))  # rows (i, j) of W'
    dense = np.zeros((start, start))
    for rows, block in blocks:
        dense[np.ix_(rows, rows)] = block
    # the flat index of each (layer, i, j): ravel a pytree of matrix positions
    order = np.asarray(ravel_pytree(jax.tree.map(jnp.asarray, trees))[0], int)
    return dense[np.ix_(order, order)]


@pytest.fixture(scope="module")
def map_dir(tmp_path_factory):
    """A finished tiny `map` run (36 -> 3 -> 3 MLP); the KFAC fits below start from it."""
    out = tmp_path_factory.mktemp("map")
    run(compose_cfg(*[o for o in SMALL if not o.startswith("method")], "method=map"), out)
    return out


@pytest.mark.parametrize("separate_bias", [False, True])
def test_tiny_two_layer_net_log_marglik_matches_dense_kronecker_matrix(map_dir, separate_bias):
    data, method, post = _fit(
        map_dir,
        "method/laplace/structure=kfac",
        "method.curvature_batches=null",
        "method/laplace/prior_precision=marglik",
        "method/laplace/predictive=probit",
        f"method.structure.separate_bias={str(separate_bias).lower()}",
    )
    g = _kron_by_hand(post, data.train.x, data.train.y, separate_bias)
    np.testing.assert_allclose(
        np.asarray(post.curvature.dense(), np.float64), g, atol=1e-4 * np.abs(g).max()
    )
    logits = post.logits_fn(post.theta, data.train.x)
    loglik = -float(optax.softmax_cross_entropy_with_integer_labels(logits, data.train.y).sum())
    sq = float(np.sum(np.asarray(post.theta, np.float64) ** 2))
    dim = g.shape[0]

    def lml(tau):
        logdet = np.linalg.slogdet(g + tau * np.eye(dim))[1]
        return loglik - 0.5 * tau * sq + 0.5 * dim * np.log(tau) - 0.5 * logdet

    tau = post.info["laplace/prior_precision"]
    np.testing.assert_allclose(post.info["laplace/log_marglik"], lml(tau), rtol=1e-4)
    for t in (0.1, 3.0, 100.0):
        np.testing.assert_allclose(
            float(gs.log_marginal_likelihood(post.curvature, t, loglik, sq)), lml(t), rtol=1e-4
        )
    grid = np.logspace(-4, 6, 1001)
    assert lml(tau) >= max(lml(t) for t in grid) - 1e-3  # the evidence maximiser
    # every τ reads the same factors: covariance, samples and logit variances
    x = data.test.x[:4]
    jac = np.asarray(jax.jacfwd(lambda th: post.logits_fn(th, x))(post.theta), np.float64)
    f = np.asarray(post.logits_fn(post.theta, x), np.float64)
    for t in (0.5, 20.0):
        cov = np.linalg.inv(g + t * np.eye(dim))
        scale = np.abs(cov).max()
        np.testing.assert_allclose(post.curvature.covariance(t), cov, atol=1e-4 * scale)
        root = np.asarray(post.curvature.sample(t, jnp.eye(dim)), np.float64)
        np.testing.assert_allclose(root @ root.T, cov, atol=1e-4 * scale)
        ref_var = np.einsum("ncp,pq,ncq->nc", jac, cov, jac)
        np.testing.assert_allclose(
            post.curvature.function_variance(t, jac), ref_var, rtol=1e-3, atol=1e-6
        )
        # the probit predictive: softmax(f / √(1 + π/8 σ²)), σ² from the dense covariance
        z = f / np.sqrt(1 + np.pi / 8 * ref_var)
        ref_probs = np.exp(z - z.max(1, keepdims=True))
        ref_probs /= ref_probs.sum(1, keepdims=True)
        member = post.replace(prior_precision=jnp.asarray(t, jnp.float32))
        (log_probs,) = method.member_log_probs(jax.random.key(0), member, x)
        np.testing.assert_allclose(np.exp(log_probs[0]), ref_probs, atol=1e-5)


def test_separate_bias_drops_only_the_weight_bias_terms(map_dir):
    """The two forms differ exactly where the joint block couples a layer's weight and bias."""
    fits = [
        _fit(
            map_dir,
            "method/laplace/structure=kfac",
            "method.curvature_batches=null",
            "method.prior_precision=1.0",
            f"method.structure.separate_bias={flag}",
        )[2]
        for flag in ("false", "true")
    ]
    joint, separate = (np.asarray(p.curvature.dense(), np.float64) for p in fits)
    tree = fits[0].unravel(jnp.arange(fits[0].theta.shape[0], dtype=jnp.float32))
    coupled = np.zeros(joint.shape, bool)
    for layer in tree.values():
        w = np.asarray(layer["kernel"], int).ravel()
        b = np.asarray(layer["bias"], int)
        coupled[np.ix_(w, b)] = coupled[np.ix_(b, w)] = True
    scale = np.abs(joint).max()
    np.testing.assert_allclose(separate[~coupled], joint[~coupled], atol=1e-5 * scale)
    np.testing.assert_allclose(separate[coupled], 0.0)
    assert np.abs(joint[coupled]).max() > 1e-3 * scale


def test_method_laplace_kfac_runs_and_reports(tmp_path):
    overrides = [o for o in TINY if o != "method=map"]
    cfg = compose_cfg(*overrides, "method=laplace_kfac", "method.predictive.members=4")
    assert cfg.method.structure._target_.endswith("KFAC")
    metrics = run(cfg, tmp_path)
    assert metrics["laplace/rank"] == metrics["laplace/num_params"] == metrics["model/params"]
    assert 0.0 < metrics["test/nll"] < 5.0
    assert metrics["laplace/curvature_examples"] == 461  # all of train (512 less 10 % val)


def test_kfac_refuses_batch_norm_before_training_and_last_layer_takes_it(tmp_path):
    keep = [o for o in TINY if o != "method=map" and not o.startswith("model")]
    bn = [*keep, "model=lenet", "model.norm=batchnorm"]
    with pytest.raises(UserError, match="subset=last_layer") as err:
        run(compose_cfg(*bn, "method=laplace_kfac"), tmp_path / "a")
    assert "BatchNorm" in str(err.value) or "scale" in str(err.value)
    # refused by the checks a run makes before it writes anything: no training step logged
    assert not (tmp_path / "a" / "history.jsonl").exists()
    assert not (tmp_path / "a" / "checkpoint" / "map.msgpack").exists()
    cfg = compose_cfg(
        *bn,
        "method=laplace_kfac",
        "method.structure.subset=last_layer",
        "trainer.epochs=1",
        "method.predictive.members=2",
    )
    metrics = run(cfg, tmp_path / "b")
    assert metrics["laplace/num_params"] == 84 * 10 + 10  # LeNet's last Dense


def test_kfac_subset_must_be_all_or_last_layer():
    with pytest.raises(UserError, match="subset"):
        KFAC(subset="first_layer")
    with pytest.raises(UserError, match="separate_bias"):
        KFAC(separate_bias="yes")


def test_joint_block_is_the_default_and_laplace_redux_separates_the_bias():
    assert build(compose_cfg(*SMALL, "method=laplace_kfac").method.structure, "s") == KFAC()
    cfg = compose_cfg("experiment=laplace_redux")
    assert build(cfg.method.structure, "s") == KFAC(subset="last_layer", separate_bias=True)
