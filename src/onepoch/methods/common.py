"""What the joint-embedding baselines share: a backbone with a projector from a spec."""

from __future__ import annotations

import torch
from torch import nn

from onepoch.models import mlp


class BackboneProjector(nn.Module):
    """``backbone`` then ``projector = mlp(feature_dim, spec)``; subclasses define ``forward``.

    ``embed_views(views, num_views)`` maps view-major (V·B, C, h, w) to float32 embeddings [V, B, d]
    and the backbone features (V·B, F) they came from.
    """

    def __init__(self, backbone: nn.Module, projector: str | int):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.feature_dim, projector)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layers an evaluation can read."""
        return {"backbone": self.backbone(x)}

    def embed_views(self, views: torch.Tensor, num_views: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(views)
        z = self.projector(h)
        return z.float().view(num_views, -1, z.shape[-1]), h
