"""bnn-bench: one command-line runner for Bayesian deep learning experiments in JAX."""

__version__ = "0.1.0"
