"""Datasets on the device: uint8 splits and a spec that preprocesses batches."""

from bnn_bench.data.dataset import KNOWN, Dataset, Spec, Split, load, resized_shape

__all__ = ["KNOWN", "Dataset", "Spec", "Split", "load", "resized_shape"]
