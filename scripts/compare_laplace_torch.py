"""Compare: bnn-bench's KFAC Laplace against laplace-torch on one tiny MLP with the same weights.

The same MLP (8x8 synthetic images, 64-16-4, a short full-batch Adam fit) is given to
both: bnn-bench's ``KFAC`` structure (``subset`` last_layer and all,
``separate_bias`` true and false) and laplace-torch's ``Laplace(model, "classification",
subset_of_weights=..., hessian_structure="kron")`` (its default backend, curvlinops'
exact-GGN KFAC), fitted on the same training images. Printed: the relative differences
of the Kronecker factors A and B (laplace-torch keeps A over the inputs alone and gives
the bias a block B of its own), of the log marginal likelihood at several τ, and the
largest difference of the probit predictive's probabilities on the test images; with
``separate_bias: false`` (bnn-bench's default joint block) the evidence and
probabilities differ by the weight-bias terms that laplace-torch drops. Also each
library's evidence-maximising τ (laplace-torch's by Adam on log τ).

torch is not a bnn-bench dependency: install laplace-torch apart, e.g.

    python3 -m venv /tmp/lt
    /tmp/lt/bin/pip install torch==2.13.0 laplace-torch==0.3
    PYTHONPATH=. python3 scripts/compare_laplace_torch.py --torch-python /tmp/lt/bin/python

This script runs itself under that interpreter (``--torch-side``, which imports only
numpy, torch and laplace) to fit laplace-torch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TAUS = (0.1, 1.0, 10.0)


def _torch_side(inputs: Path, outputs: Path) -> None:
    """laplace-torch on the arrays of ``inputs`` (.npz); writes its results to ``outputs``."""
    import torch
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    d = np.load(inputs)
    x, y, xt = (torch.from_numpy(d[k]) for k in ("x", "y", "x_test"))
    hidden, classes = d["k0"].shape[1], d["k1"].shape[1]
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes)
    )
    with torch.no_grad():
        for i, layer in ((0, model[0]), (1, model[2])):
            layer.weight.copy_(torch.from_numpy(d[f"k{i}"].T))  # torch's weight is (out, in)
            layer.bias.copy_(torch.from_numpy(d[f"b{i}"]))
    loader = DataLoader(TensorDataset(x, y.long()), batch_size=16)  # batches are summed
    out = {}
    for subset in ("last_layer", "all"):
        la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure="kron")
        la.fit(loader)
        for i, factors in enumerate(la.H_facs.kfacs):  # [B, A] (weight), [B] (bias), ...
            for name, f in zip(("B", "A"), factors, strict=False):
                out[f"{subset}/factor{i}/{name}"] = f.detach().numpy()
        for tau in TAUS:
            lml = la.log_marginal_likelihood(torch.tensor(tau))
            out[f"{subset}/lml/{tau}"] = np.float64(lml.item())
            la.prior_precision = tau
            probs = la(xt, pred_type="glm", link_approx="probit")
            out[f"{subset}/probit/{tau}"] = probs.detach().numpy()
        la.prior_precision = 1.0
        la.optimize_prior_precision(
            pred_type="glm", method="marglik", n_steps=1000, lr=0.05, link_approx="probit"
        )
        out[f"{subset}/marglik_tau"] = np.float64(la.prior_precision.item())
        out[f"{subset}/loglik"] = np.float64(la.log_likelihood.item())
    np.savez(outputs, **out)


def _project_side(args) -> tuple[dict, dict]:
    """bnn-bench's KFAC fits on the tiny MLP; returns (arrays for the torch side, results)."""
    import jax
    import jax.numpy as jnp
    import optax

    from bnn_bench.data import preset
    from bnn_bench.methods.laplace import KFAC, LaplacePosterior, Probit
    from bnn_bench.methods.laplace import curvature as cv
    from bnn_bench.methods.laplace import gaussian as gs
    from bnn_bench.models import build_model
    from bnn_bench.models.mlp import MLP

    data = preset(
        "synthetic", shape=[8, 8, 1], num_classes=4, train_size=args.train_size, test_size=64
    )
    model = build_model(MLP(4, hidden=(16,)), data.spec, "mlp")
    params, state = model.init(jax.random.key(args.seed))
    train, test = data.train, data.test

    def loss(p):
        logits = model.apply(p, state, train.x)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, train.y).mean()

    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s

    for _ in range(args.steps):
        params, opt_state = step(params, opt_state)

    feats = lambda x: np.asarray(model.spec.preprocess(x), np.float32).reshape(len(x), -1)
    arrays = {"x": feats(train.x), "y": np.asarray(train.y, np.int64), "x_test": feats(test.x)}
    for i in range(2):
        arrays[f"k{i}"] = np.asarray(params[f"Dense_{i}"]["kernel"], np.float32)
        arrays[f"b{i}"] = np.asarray(params[f"Dense_{i}"]["bias"], np.float32)

    results = {}
    idx = jnp.arange(train.size)[None]  # one batch of all training images
    for subset in ("last_layer", "all"):
        for separate in (True, False):
            structure = KFAC(subset=subset, separate_bias=separate)
            post = LaplacePosterior.at_map(model, params, state, structure.head(model))
            curv = structure.fit(
                jax.random.key(0), post, train, idx, jnp.ones(idx.shape), 1.0, cv.GGN()
            )
            post = post.replace(curvature=curv)
            logp = jax.nn.log_softmax(post.logits_fn(post.theta, train.x), -1)
            loglik = float(jnp.take_along_axis(logp, train.y[:, None], -1).sum())
            sq = float(jnp.sum(jnp.square(post.theta)))
            r = {
                "factors": [
                    ((q * e) @ q.T, (qb * b) @ qb.T)
                    for q, e, qb, b in zip(curv.qa, curv.a, curv.qb, curv.b, strict=True)
                ],
                "loglik": loglik,
            }
            for tau in TAUS:
                r[f"lml/{tau}"] = float(gs.log_marginal_likelihood(curv, tau, loglik, sq))
                p = post.replace(prior_precision=jnp.asarray(tau, jnp.float32))
                (log_probs,) = Probit().member_log_probs(None, p, test.x, 1)  # log-probabilities
                r[f"probit/{tau}"] = np.exp(np.asarray(log_probs[0]))
            r["marglik_tau"] = gs.maximise_marginal_likelihood(curv, loglik, sq, 1e-4, 1e6)[0]
            results[subset, separate] = r
    return arrays, results


def _rel(a, b) -> float:
    """max |a − b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--torch-python", help="a python with torch and laplace-torch installed")
    ap.add_argument("--train-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300, help="full-batch Adam steps of the MLP")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-side", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_side:
        _torch_side(Path(args.torch_side[0]), Path(args.torch_side[1]))
        return 0
    if not args.torch_python:
        print("give --torch-python (see --help for installing laplace-torch)", file=sys.stderr)
        return 2

    arrays, ours = _project_side(args)
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inputs, **arrays)
        cmd = [args.torch_python, __file__, "--torch-side", str(inputs), str(outputs)]
        subprocess.run(cmd, check=True)
        theirs = dict(np.load(outputs))
    version = subprocess.run(
        [
            args.torch_python,
            "-c",
            "import importlib.metadata as m; print(m.version('laplace-torch'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    print(
        f"laplace-torch {version}; tiny MLP 64-16-4, {args.train_size} training images; "
        f"rel = max |ours − theirs| / max |theirs|; evidence at τ = {', '.join(map(str, TAUS))}"
    )
    print(
        "| subset | separate_bias | A rel | B rel | evidence rel (max) | evidence ours − theirs "
        "at τ = 1 (nats) | probit max abs diff | marglik τ ours / theirs (Adam) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for subset in ("last_layer", "all"):
        for separate in (True, False):
            r = ours[subset, separate]
            a_err = b_err = "–"  # the joint block's A has no counterpart in laplace-torch
            if separate:  # block for block: (A_w, B) of a weight, (1, B) of its bias
                errs_a, errs_b = [], []
                for i, (a, b) in enumerate(r["factors"]):
                    errs_b.append(_rel(b, theirs[f"{subset}/factor{i}/B"]))
                    ref_a = theirs.get(f"{subset}/factor{i}/A", np.ones((1, 1)))  # bias: B alone
                    errs_a.append(_rel(a, ref_a))
                a_err, b_err = f"{max(errs_a):.1e}", f"{max(errs_b):.1e}"
            lml = [(r[f"lml/{t}"], float(theirs[f"{subset}/lml/{t}"])) for t in TAUS]
            lml_rel = max(abs(o - t) / abs(t) for o, t in lml)
            lml_diff = r["lml/1.0"] - float(theirs[f"{subset}/lml/1.0"])
            probit = max(
                float(np.abs(r[f"probit/{t}"] - theirs[f"{subset}/probit/{t}"]).max()) for t in TAUS
            )
            tau, ref_tau = r["marglik_tau"], float(theirs[f"{subset}/marglik_tau"])
            print(
                f"| {subset} | {str(separate).lower()} | {a_err} | {b_err} | {lml_rel:.1e} | "
                f"{lml_diff:+.2e} | {probit:.1e} | {tau:.4f} / {ref_tau:.4f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
