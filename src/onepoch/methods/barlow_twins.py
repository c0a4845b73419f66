"""Barlow Twins (Zbontar et al. 2021): a projector on the backbone; the cross-correlation matrix of
the batch-standardised embeddings of two views is pushed to the identity.

Projector from a spec (paper: ``8192-8192-8192``, hidden Linear+BN+ReLU, final Linear; the loss
standardises each dimension over the batch, as the paper's BN without affine parameters does);
loss :func:`onepoch.losses.barlow_twins_loss` with off-diagonal weight λ = 5e-3, averaged over pairs
of views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onepoch.errors import ConfigError
from onepoch.losses import barlow_twins_loss
from onepoch.methods.common import BackboneProjector
from onepoch.models import parse_mlp_spec


@dataclass
class BarlowTwinsConfig:
    projector: str | int = "8192-8192-8192"
    lambda_offdiag: float = 5e-3

    def __post_init__(self):
        parse_mlp_spec(self.projector)
        if self.lambda_offdiag < 0:
            raise ConfigError(f"method.lambda_offdiag must be >= 0, got {self.lambda_offdiag}")


class BarlowTwins(BackboneProjector):
    """``forward(views)`` with view groups (V_g, B, C, h, w) of one size → (loss, metrics, backbone
    features of every view)."""

    name = "barlow_twins"

    def __init__(self, backbone: nn.Module, config: BarlowTwinsConfig):
        super().__init__(backbone, config.projector)
        self.config = config

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        z, h = self.embed_views(views)
        loss = barlow_twins_loss(z, self.config.lambda_offdiag)
        return loss, {"barlow_twins": loss.detach()}, h
