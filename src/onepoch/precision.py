"""Where bfloat16 arithmetic is native: the one fact the evaluation's precision choices read."""

from __future__ import annotations

import torch

__all__ = ["native_bf16"]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 products natively, several times faster than float32: any CUDA device
    this library targets, or a CPU with AMX tiles (``torch.cpu._is_amx_tile_supported``, absent in old
    PyTorch builds, which count as no). ``python benchmarks/eval.py`` measures what it buys for embedding."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check is not None and check())
