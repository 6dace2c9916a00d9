"""Datasets on the device: uint8 splits and a spec that preprocesses batches."""

from bnn_bench.data.dataset import Dataset, Spec, Split, load, preset, resized_shape

__all__ = ["Dataset", "Spec", "Split", "load", "preset", "resized_shape"]
