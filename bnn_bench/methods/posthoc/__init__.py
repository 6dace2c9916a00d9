"""Methods that start from a MAP network, on one template (``PostHoc``)."""

from bnn_bench.methods.posthoc.base import PostHoc, map_point

__all__ = ["PostHoc", "map_point"]
