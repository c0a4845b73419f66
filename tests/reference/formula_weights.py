"""Weights and an input image batch given by formulas (no random generator), so that two programs
that share no code but this file (tests/reference/make_export_reference.py in the reference
environment with torchvision and timm, and tests/test_export.py beside onepoch) build exactly the same
numbers for a parameter of a given name and shape.

For the parameter ``name`` with ``n`` values, value ``i`` is ``sin(0.61 * i + phase)`` with
``phase = 2 pi crc32(name) / 2^32``, scaled by the kind of tensor:

- 4-D (a convolution): ``sqrt(2) * sqrt(2 / fan_in)`` (He's scale; sin has RMS 1/sqrt(2));
- 2-D (a linear layer): 0.01;
- 1-D ``...weight`` (BatchNorm scale): ``1 + 0.1 sin``; ``...bias``: ``0.05 sin``;
  ``running_mean``: ``0.05 sin``; ``running_var``: ``1 + 0.2 sin^2`` (positive);
- ``num_batches_tracked``: 0 (int64).
"""

from __future__ import annotations

import math
import zlib

import numpy as np


def formula_tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The formula value of parameter ``name`` with ``shape`` (float32; int64 for num_batches_tracked)."""
    if name.endswith("num_batches_tracked"):
        return np.zeros(shape, dtype=np.int64)
    phase = 2 * math.pi * zlib.crc32(name.encode()) / 2**32
    s = np.sin(0.61 * np.arange(int(np.prod(shape)), dtype=np.float64) + phase).reshape(shape)
    if len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
        v = math.sqrt(2) * math.sqrt(2 / fan_in) * s
    elif len(shape) == 2:
        v = 0.01 * s
    elif name.endswith("running_var"):
        v = 1 + 0.2 * s**2
    elif name.endswith("running_mean") or name.endswith("bias"):
        v = 0.05 * s
    else:
        v = 1 + 0.1 * s
    return v.astype(np.float32)


def formula_input(n: int = 2, channels: int = 3, size: int = 64) -> np.ndarray:
    """An (n, channels, size, size) float32 batch: ``sin(0.05 i) + 0.3 cos(0.011 i)`` over the flat index."""
    i = np.arange(n * channels * size * size, dtype=np.float64)
    return (np.sin(0.05 * i) + 0.3 * np.cos(0.011 * i)).reshape(n, channels, size, size).astype(np.float32)
