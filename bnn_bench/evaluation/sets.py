"""The evaluation sets of a run, built before ``fit``: samplers fold every member
into all of them while sampling (DESIGN.md), so all sets must exist up front.

Sets: ``test``, ``val`` (when the dataset has one), ``ood`` (the test split of
``eval.ood_dataset``; its labels are not used) and ``shift/<corruption>/<level>``
(corrupted copies of the test set).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from bnn_bench.config import build
from bnn_bench.data import Dataset, Split
from bnn_bench.data.stored import config_key
from bnn_bench.errors import UserError
from bnn_bench.evaluation.settings import EvalSettings
from bnn_bench.evaluation.shift import corrupt, is_tfds, level_name, load_cifar10_corrupted

log = logging.getLogger(__name__)


def ood_split(ood: Dataset, spec_shape: tuple[int, int, int]) -> Split:
    """The OOD dataset's test split, as uint8 images of the in-distribution shape.

    An OOD dataset with ``resize`` set is resized on the device first (bilinear,
    rounded back to uint8), so e.g. ``dataset@eval.ood_dataset=mnist
    eval.ood_dataset.resize=[32,32]`` can be compared with 32x32 data of one channel.

    Raises:
      UserError: when the shapes still differ, before any training.
    """
    x = ood.test.x
    shape = ood.spec.input_shape
    if tuple(shape) != tuple(ood.spec.shape):
        h, w, c = shape
        x = jax.image.resize(
            x.astype(jnp.float32), (x.shape[0], h, w, c), method="linear", antialias=False
        )
        x = jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)
    if tuple(x.shape[1:]) != tuple(spec_shape):
        raise UserError(
            f"eval.ood_dataset {ood.spec.name} has images of shape {tuple(x.shape[1:])}, but the "
            f"model takes {tuple(spec_shape)} (the dataset's stored shape). Choose an OOD dataset "
            f"with as many channels and set eval.ood_dataset.resize=[{spec_shape[0]}, "
            f"{spec_shape[1]}]."
        )
    return Split(x, ood.test.y)


def evaluation_sets(data: Dataset, settings: EvalSettings) -> dict[str, Split]:
    """Every evaluation set of the run, by name (see the module docstring)."""
    sets = {"test": data.test}
    if data.val is not None:
        sets["val"] = data.val
    if settings.ood_dataset is not None:
        with config_key("eval.ood_dataset"):  # its errors name its keys there
            ood = build(settings.ood_dataset, "eval.ood_dataset").load()
        sets["ood"] = ood_split(ood, data.spec.shape)
    if settings.shift:
        test = data.test
        if settings.shift_size is not None:
            test = Split(test.x[: settings.shift_size], test.y[: settings.shift_size])
        key = jax.random.key(settings.shift_seed)
        for i, (name, level) in enumerate(settings.shift_sets()):
            if is_tfds(name):
                sets[f"shift/{name}/{level_name(level)}"] = _tfds_split(
                    name, level, data.spec.shape, settings
                )
            else:
                x = corrupt(jax.random.fold_in(key, i), test.x, name, level)
                sets[f"shift/{name}/{level_name(level)}"] = Split(x, test.y)
    log.info("evaluation sets: %s", ", ".join(f"{k} ({v.size})" for k, v in sets.items()))
    return sets


def _tfds_split(name: str, level: float, shape, settings: EvalSettings) -> Split:
    """A prepared CIFAR-10-C set, checked against the data's shape, cut to ``shift_size``."""
    if tuple(shape) != (32, 32, 3):
        raise UserError(
            f"eval.shift={name} is CIFAR-10-C (32x32x3 images); the dataset's images "
            f"are {tuple(shape)}. Use it with dataset=cifar10."
        )
    x, y = load_cifar10_corrupted(name, int(level), settings.tfds_data_dir, settings.download)
    n = settings.shift_size or len(y)
    return Split(jnp.asarray(x[:n]), jnp.asarray(y[:n]))


def labels_of(sets: dict[str, Split]) -> dict[str, jax.Array | None]:
    """The labels that metrics use: none for the OOD set."""
    return {name: None if name == "ood" else split.y for name, split in sets.items()}
