"""What the joint-embedding baselines share: a backbone with a projector from a spec, view groups
stacked for one backbone pass, and the EMA target networks of BYOL and ReSSL."""

from __future__ import annotations

import math

import torch
from torch import nn

from onepoch.models import mlp


def stack_views(views: list[torch.Tensor]) -> torch.Tensor:
    """View groups (V_g, B, C, h, w) of one size, stacked into one (V, B, C, h, w)."""
    if len({tuple(v.shape[1:]) for v in views}) != 1:
        shapes = ", ".join(str(tuple(v.shape)) for v in views)
        raise ValueError(f"these view groups differ in batch or view size and cannot be stacked: {shapes}")
    return views[0] if len(views) == 1 else torch.cat(views, dim=0)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's EMA momentum at ``step``: τ = 1 − (1 − τ_base)·(cos(π·step/total) + 1)/2 (τ_base → 1)."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """ξ ← τ·ξ + (1 − τ)·θ for each parameter pair (the target's buffers keep their own statistics)."""
    tgt = list(target.parameters())
    src = list(online.parameters())
    if len(tgt) != len(src) or any(a.shape != b.shape for a, b in zip(tgt, src)):
        raise ValueError("ema_update_ needs two modules of the same structure")
    torch._foreach_lerp_(tgt, [p.detach() for p in src], 1.0 - momentum)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters get no gradient (an EMA target)."""
    import copy

    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class BackboneProjector(nn.Module):
    """``backbone`` then ``projector = mlp(feature_dim, spec)``; subclasses define ``forward``.

    ``embed_views(views)`` maps view groups (V_g, B, C, h, w) of one size to float32 embeddings
    [V, B, d] and the backbone features (V·B, F) they came from, in one backbone pass.
    """

    def __init__(self, backbone: nn.Module, projector: str | int):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.feature_dim, projector)

    feature_layers = ("backbone", "projector")

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layers an evaluation can read: the backbone output and the projector's."""
        h = self.backbone(x)
        return {"backbone": h, "projector": self.projector(h)}

    def embed_views(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = stack_views(views)
        v, b = x.shape[:2]
        h = self.backbone(x.flatten(0, 1))
        z = self.projector(h)
        return z.float().view(v, b, z.shape[-1]), h
