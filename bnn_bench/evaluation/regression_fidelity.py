"""Fidelity of a regression predictive to a reference run (e.g. HMC): the NeurIPS 2021
approximate-inference competition's "W2" distance, and the errors of the predictive mean
and standard deviation.

A regression run keeps its members: ``predictive/<set>.npy`` is (S, N, 2) float32, every
member's (mean, σ) in the target's original units, for every labelled evaluation set, beside
the same ``fingerprints.json`` as a classification run (``fidelity``) with
``"task": "regression"`` and the target's standardisation. ``eval.reference=<run>`` (or
``bnn-bench-compare --reference``) then reports, per shared set:

- ``<set>/w2``: the competition's score (``metrics.py`` of the NeurIPS 2021 BDL competition,
  which returns it negated): per input, ``scipy.stats.wasserstein_distance`` between 1,000
  predictive draws of this run's mixture and 1,000 of the reference's, averaged over inputs.
  Despite its name, scipy's distance is the 1-Wasserstein distance of the two empirical
  distributions; for samples of equal size it is mean_k |a_(k) − b_(k)| of the sorted draws,
  which is how it is computed here (tested against scipy). The draws come from a fixed seed,
  so the number is reproducible; a run scored against itself gets 0.
- ``<set>/mean_error``: mean over inputs of |E[y] − E_ref[y]|;
- ``<set>/std_error``: mean over inputs of |sd[y] − sd_ref[y]| (the mixtures' moments, exact).

All three are in the target's units.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnn_bench.errors import UserError
from bnn_bench.evaluation import regression as R
from bnn_bench.reporting.outputs import write_json_atomic, write_npy_atomic
from bnn_bench.run_folder import FINGERPRINTS, PREDICTIVE

NUM_DRAWS = 1000  # per input, as the competition's samples
DRAW_SEED = 0


def draws(mu, sd, num: int = NUM_DRAWS, seed: int = DRAW_SEED) -> np.ndarray:
    """(N, num) draws of each input's mixture: a member uniformly at random, then its
    Gaussian; the same ``seed`` gives the same draws."""
    mu, sd = np.asarray(mu, np.float64), np.asarray(sd, np.float64)
    rng = np.random.default_rng(seed)
    s, n = mu.shape
    pick = rng.integers(0, s, (n, num))  # (N, num)
    rows = np.arange(n)[:, None]
    return mu[pick, rows] + sd[pick, rows] * rng.standard_normal((n, num))


def w2(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of scipy.stats.wasserstein_distance(a[n], b[n]) for (N, M) samples
    of equal size M: the mean absolute difference of the sorted samples."""
    return float(np.mean(np.abs(np.sort(a, -1) - np.sort(b, -1))))


def fidelity_metrics(
    mine: dict[str, tuple[np.ndarray, np.ndarray]],
    reference: dict[str, tuple[np.ndarray, np.ndarray]],
    sets: list[str],
) -> dict[str, float]:
    """``<set>/w2``, ``<set>/mean_error`` and ``<set>/std_error`` of this run's mixture
    against the reference's, set name -> (mu, sd) each (S, N) in original units."""
    out = {}
    for name in sets:
        (mu, sd), (mu_ref, sd_ref) = mine[name], reference[name]
        out[f"{name}/w2"] = w2(draws(mu, sd), draws(mu_ref, sd_ref))
        mean, std = R.moments(mu, sd)
        mean_ref, std_ref = R.moments(mu_ref, sd_ref)
        out[f"{name}/mean_error"] = float(np.mean(np.abs(mean - mean_ref)))
        out[f"{name}/std_error"] = float(np.mean(np.abs(std - std_ref)))
    return out


def from_file(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, N, 2) stored (mean, σ) -> (mu, sd), each (S, N)."""
    members = np.asarray(members, np.float64)
    return members[..., 0], members[..., 1]


def fingerprints(prints: dict, target_mean: float, target_std: float) -> dict:
    """A classification run's fingerprints (``fidelity.fingerprints``) marked as regression,
    with the target's standardisation: a reference must share it."""
    return {
        **prints,
        "task": "regression",
        "target": {"mean": float(target_mean), "std": float(target_std)},
    }


def write_predictive(out_dir: str | Path, mine: dict[str, tuple], prints: dict) -> Path:
    """Writes ``predictive/<set>.npy`` (S, N, 2) float32 (mean, σ) in original units for
    every fingerprinted set, then ``fingerprints.json``; each atomically."""
    folder = Path(out_dir) / PREDICTIVE
    for name, fp in prints["sets"].items():
        mu, sd = mine[name]
        write_npy_atomic(folder / fp["file"], np.stack([mu, sd], -1).astype(np.float32))
    write_json_atomic(folder / FINGERPRINTS, prints)
    return folder


def check_target(prints: dict, ref: dict, what: str) -> None:
    """Refuses a reference that is not a regression run of the same target scaling.

    Raises:
      UserError: naming the difference.
    """
    if ref.get("task") != "regression":
        raise UserError(
            f"{what}: the reference is a classification run and this run is a regression; "
            f"score a regression run against a regression reference (e.g. method=hmc on "
            f"the same dataset)."
        )
    if ref.get("target") != prints["target"]:
        raise UserError(
            f"{what}: the targets were standardised differently (this run: "
            f"{prints['target']}; the reference: {ref.get('target')}): another dataset or "
            f"split. Score a run only against a reference of the same data."
        )


@dataclass(frozen=True)
class RegressionReference:
    """A finished regression run's members to score this run against (``eval.reference``).

    Attributes:
      sets: the labelled sets both runs share (checked to be the same data).
      members: set name -> (mu, sd), each (S_ref, N), of the reference in original units.
    """

    sets: list[str]
    members: dict[str, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def load(cls, run_dir: str | Path | None, prints: dict) -> RegressionReference | None:
        """Reads and checks the reference; None if no reference is set.

        Raises:
          UserError: when it is missing, not a regression run, or of other data.
        """
        from bnn_bench.evaluation import fidelity

        if run_dir is None:
            return None
        what = f"eval.reference={run_dir}"
        ref_prints, arrays = fidelity.read_predictive(run_dir, what)
        check_target(prints, ref_prints, what)
        sets = fidelity.shared_sets(prints, ref_prints, what)
        return cls(sets, {name: from_file(arrays[name]) for name in sets})

    def metrics(self, mine: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """W2, mean and std errors of this run's (mu, sd) on every shared set."""
        return fidelity_metrics(mine, self.members, self.sets)
