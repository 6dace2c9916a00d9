"""Where a dataset config would load from, and its split sizes, without reading the data.

``dry_run=true`` calls ``resolve`` on the dataset's typed config: its ``locate()``
(``StoredDataset``, ``SyntheticDataset``, ``UciDataset``, ``ToyGapDataset``) makes the
same checks and walks the same sources in the same order as its ``load()``, but reads
only file headers and metadata. The result is a ``Dataset`` whose splits hold
``jax.ShapeDtypeStruct``s instead of arrays.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from bnn_bench.data import dataset as ds
from bnn_bench.data.stored import StoredDataset
from bnn_bench.data.synthetic import SyntheticDataset
from bnn_bench.data.toy_gap import ToyGapDataset
from bnn_bench.data.uci import UciDataset

DatasetConfig = StoredDataset | SyntheticDataset | UciDataset | ToyGapDataset

log = logging.getLogger(__name__)


def _shapes(n: int, spec: ds.Spec) -> ds.Split:
    y = np.int32 if spec.task == "classification" else np.float32
    return ds.Split(
        jax.ShapeDtypeStruct((n, *spec.shape), spec.dtype), jax.ShapeDtypeStruct((n,), y)
    )


def resolve(config: DatasetConfig) -> ds.Dataset:
    """The dataset ``config`` (a built ``conf/dataset`` node) would load, as shapes only.

    ``Dataset.source`` says where the data would come from. A dataset whose sizes
    neither its files nor ``stored.PUBLISHED`` tell is loaded for real (slower, but
    never wrong).

    Raises:
      UserError: what ``load`` would raise for a missing source or a bad setting.
    """
    located: ds.Located = config.locate()
    if located.sizes is None:
        log.info("the sizes of %s are not known without reading it; loading it.", located.spec.name)
        return config.load()
    sizes, spec = located.sizes, located.spec
    return ds.Dataset(
        spec,
        _shapes(sizes["train"], spec),
        _shapes(sizes["test"], spec),
        _shapes(sizes["val"], spec) if sizes["val"] else None,
        source=located.source,
    )
