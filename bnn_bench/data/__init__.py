"""Datasets on the device: splits and a spec that preprocesses batches; one typed config
per kind of dataset (``StoredDataset``, ``SyntheticDataset`` for image classification;
``UciDataset``, ``ToyGapDataset`` for regression), each with ``load()`` and ``locate()``."""

from bnn_bench.data.dataset import Dataset, Located, Spec, Split, preset, resized_shape
from bnn_bench.data.diabetes import DiabetesSplits
from bnn_bench.data.stored import StoredDataset
from bnn_bench.data.synthetic import SyntheticDataset
from bnn_bench.data.toy_gap import ToyGapDataset
from bnn_bench.data.uci import UciDataset

__all__ = [
    "Dataset",
    "DiabetesSplits",
    "Located",
    "Spec",
    "Split",
    "StoredDataset",
    "SyntheticDataset",
    "ToyGapDataset",
    "UciDataset",
    "preset",
    "resized_shape",
]
