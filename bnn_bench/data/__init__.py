"""Datasets on the device: uint8 splits and a spec that preprocesses batches; one typed
config per kind of dataset (``StoredDataset``, ``SyntheticDataset``), each with
``load()`` and ``locate()``."""

from bnn_bench.data.dataset import Dataset, Located, Spec, Split, preset, resized_shape
from bnn_bench.data.stored import StoredDataset
from bnn_bench.data.synthetic import SyntheticDataset

__all__ = [
    "Dataset",
    "Located",
    "Spec",
    "Split",
    "StoredDataset",
    "SyntheticDataset",
    "preset",
    "resized_shape",
]
