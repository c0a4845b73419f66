"""Barlow Twins (Zbontar et al. 2021): a projector on the backbone; the cross-correlation matrix of
the batch-standardised embeddings of two views is pushed to the identity.

Projector from a spec (paper: ``8192-8192-8192``, hidden Linear+BN+ReLU, final Linear; the loss
standardises each dimension over the batch, as the paper's BN without affine parameters does);
loss :func:`onepoch.losses.barlow_twins_loss` with off-diagonal weight λ = 5e-3, averaged over pairs
of views.

``bn_views`` (default ``separate``): the official code runs backbone and projector on each view as
its own batch (``z1 = projector(backbone(y1)); z2 = projector(backbone(y2))``), so BatchNorm
statistics never mix the views; ``joint`` runs all views in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onepoch.distributed import gather_batch
from onepoch.errors import ConfigError
from onepoch.losses import barlow_twins_loss
from onepoch.methods.common import BackboneProjector, check_bn_views
from onepoch.models import parse_mlp_spec


@dataclass
class BarlowTwinsConfig:
    projector: str | int = "8192-8192-8192"
    lambda_offdiag: float = 5e-3
    bn_views: str = "separate"          # each view its own batch, as the official code

    def __post_init__(self):
        parse_mlp_spec(self.projector)
        check_bn_views(self.bn_views)
        if self.lambda_offdiag < 0:
            raise ConfigError(f"method.lambda_offdiag must be >= 0, got {self.lambda_offdiag}")


class BarlowTwins(BackboneProjector):
    """``forward(views)`` with view groups (V_g, B, C, h, w) of one size → (loss, metrics, backbone
    features of every view)."""

    name = "barlow_twins"

    def __init__(self, backbone: nn.Module, config: BarlowTwinsConfig):
        super().__init__(backbone, config.projector, config.bn_views)
        self.config = config

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        z, h = self.embed_views(views)
        z = gather_batch(z, dim=1)  # the global batch under DDP: its cross-correlation
        loss = barlow_twins_loss(z, self.config.lambda_offdiag)
        return loss, {"barlow_twins": loss.detach()}, h
