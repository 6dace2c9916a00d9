"""Where a dataset config would load from, and its split sizes, without reading the data.

``dry_run=true`` calls ``resolve(cfg.dataset)``. It builds the node with the
loader's ``locate`` sibling (``bnn_bench.data.locate``, ``synthetic.locate``), which
takes the same arguments, makes the same checks and walks the same sources in the
same order as ``load``, but reads only file headers and metadata. The result is a
``Dataset`` whose splits hold ``jax.ShapeDtypeStruct``s instead of arrays.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from bnn_bench.data import dataset as ds

log = logging.getLogger(__name__)

# load -> the function that answers for it without reading the data
_LOCATE = {
    "bnn_bench.data.load": "bnn_bench.data.locate",
    "bnn_bench.data.dataset.load": "bnn_bench.data.locate",
    "bnn_bench.data.synthetic.load": "bnn_bench.data.synthetic.locate",
}
# (train, test) sizes as TFDS and the authors publish them: for sources whose sizes
# cannot be read without reading the data (CIFAR-10's pickles, a download)
PUBLISHED = {
    "mnist": (60_000, 10_000),
    "fashion_mnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
}


def _shapes(n: int, shape: tuple[int, ...]) -> ds.Split:
    return ds.Split(
        jax.ShapeDtypeStruct((n, *shape), np.uint8), jax.ShapeDtypeStruct((n,), np.int32)
    )


def resolve(node: DictConfig) -> ds.Dataset:
    """The dataset ``node`` (a ``conf/dataset`` config) would load, as shapes only.

    ``Dataset.source`` says where the data would come from. A dataset target without
    a ``locate``, or one whose sizes neither its files nor ``PUBLISHED`` tell, is
    loaded for real (slower, but never wrong).

    Raises:
      UserError: what ``load`` would raise for a missing source or a bad setting.
    """
    from bnn_bench.config import build

    target = str(node.get("_target_", ""))
    if target not in _LOCATE:
        log.info("dataset target %s has no cheap resolve; loading it.", target)
        return build(node, "dataset")
    probe = OmegaConf.merge(node, {"_target_": _LOCATE[target]})
    located: ds.Located = build(probe, "dataset")
    sizes = located.sizes
    if sizes is None and node.get("name") in PUBLISHED:
        sizes = ds.split_sizes(
            *PUBLISHED[node.name],
            node.get("val_from", "train"),
            node.get("val_fraction", 0.1),
            node.get("subset"),
        )
    if sizes is None:
        log.info("the sizes of %s are not known without reading it; loading it.", target)
        return build(node, "dataset")
    shape = located.spec.shape
    return ds.Dataset(
        located.spec,
        _shapes(sizes["train"], shape),
        _shapes(sizes["test"], shape),
        _shapes(sizes["val"], shape) if sizes["val"] else None,
        source=located.source,
    )
