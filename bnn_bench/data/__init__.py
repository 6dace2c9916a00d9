"""Datasets on the device: uint8 splits and a spec that preprocesses batches."""

from bnn_bench.data.dataset import (
    Dataset,
    Located,
    Spec,
    Split,
    load,
    locate,
    preset,
    resized_shape,
)

__all__ = ["Dataset", "Located", "Spec", "Split", "load", "locate", "preset", "resized_shape"]
