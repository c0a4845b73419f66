"""onepoch: fast self-supervised learning of image representations (EMP-SSL and baselines)."""

__version__ = "0.1.0"
