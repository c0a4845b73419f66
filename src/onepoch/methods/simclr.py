"""SimCLR (Chen et al. 2020): a projector on the backbone and NT-Xent over all views of the batch.

Projector from a spec (default ``2048-2048-128``: hidden Linear+BN+ReLU, final Linear); loss
:func:`onepoch.losses.nt_xent_loss` with temperature τ (0.2; Bordes et al. 2023's single-GPU recipe
uses 0.15 with lr 1.0). Any number of views >= 2.

``bn_views`` (default ``joint``): the official code concatenates the two views along the batch and
runs backbone and projection head once on all 2B images, so BatchNorm statistics span both views;
``separate`` runs each view as its own batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onepoch.distributed import gather_batch
from onepoch.errors import ConfigError
from onepoch.losses import nt_xent_loss
from onepoch.methods.common import BackboneProjector, check_bn_views
from onepoch.models import parse_mlp_spec


@dataclass
class SimCLRConfig:
    projector: str | int = "2048-2048-128"
    temperature: float = 0.2
    bn_views: str = "joint"             # all views in one batch, as the official code

    def __post_init__(self):
        parse_mlp_spec(self.projector)
        check_bn_views(self.bn_views)
        if not self.temperature > 0:
            raise ConfigError(f"method.temperature must be > 0, got {self.temperature}")


class SimCLR(BackboneProjector):
    """``forward(views)`` with view groups (V_g, B, C, h, w) of one size → (loss, metrics, backbone
    features of every view)."""

    name = "simclr"

    def __init__(self, backbone: nn.Module, config: SimCLRConfig):
        super().__init__(backbone, config.projector, config.bn_views)
        self.config = config

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        z, h = self.embed_views(views)
        z = gather_batch(z, dim=1)  # the global batch under DDP: every rank's negatives
        loss = nt_xent_loss(z, self.config.temperature)
        return loss, {"nt_xent": loss.detach()}, h
