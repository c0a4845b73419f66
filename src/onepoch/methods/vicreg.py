"""VICReg (Bardes, Ponce, LeCun 2022): an expander on the backbone and variance-invariance-covariance
regularisation of the embeddings of every pair of views.

Expander from a spec (paper: ``8192-8192-8192``, hidden Linear+BN+ReLU, final Linear); loss
:func:`onepoch.losses.vicreg_loss` with λ = 25 (invariance), μ = 25 (variance, averaged over the
views), ν = 1 (covariance, summed over the two views), as the official code.

``bn_views`` (default ``separate``): the official code runs backbone and expander on each view as
its own batch (``x = projector(backbone(x)); y = projector(backbone(y))``), so BatchNorm statistics
never mix the views; ``joint`` runs all views in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onepoch.distributed import gather_batch
from onepoch.errors import ConfigError
from onepoch.losses import vicreg_loss
from onepoch.methods.common import BackboneProjector, check_bn_views
from onepoch.models import parse_mlp_spec


@dataclass
class VICRegConfig:
    projector: str | int = "8192-8192-8192"
    sim_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0
    bn_views: str = "separate"          # each view its own batch, as the official code

    def __post_init__(self):
        parse_mlp_spec(self.projector)
        check_bn_views(self.bn_views)
        for key in ("sim_weight", "var_weight", "cov_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0, got {getattr(self, key)}")


class VICReg(BackboneProjector):
    """``forward(views)`` with view groups (V_g, B, C, h, w) of one size → (loss, metrics, backbone
    features of every view)."""

    name = "vicreg"

    def __init__(self, backbone: nn.Module, config: VICRegConfig):
        super().__init__(backbone, config.projector, config.bn_views)
        self.config = config

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        c = self.config
        z, h = self.embed_views(views)
        z = gather_batch(z, dim=1)  # the global batch under DDP: its variance and covariance
        loss, parts = vicreg_loss(z, sim_weight=c.sim_weight, var_weight=c.var_weight, cov_weight=c.cov_weight)
        return loss, parts, h
