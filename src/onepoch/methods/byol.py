"""BYOL (Grill et al. 2020): an online network (backbone, projector, predictor) predicts the
projection of another view by a target network, an exponential moving average of the online one.

Projector and predictor from specs (paper: ``4096-256`` each: Linear+BN+ReLU, Linear); loss
:func:`onepoch.losses.byol_loss` (the paper's L + L̃ for two views: both directions summed). After
each optimizer step the target follows ξ ← τ·ξ + (1 − τ)·θ, with τ going from ``momentum`` (0.996)
to 1 on a cosine over the run. The paper's views are asymmetric (blur p 1.0 / 0.1, solarize p 0 /
0.2): give them as two ``views.groups`` (see ``configs/byol/``).

``bn_views`` (default ``separate``): the official code applies the online network (backbone,
projector, predictor) and the target network to each view as its own batch, so BatchNorm statistics
never mix the views; ``joint`` runs all views in one batch. The target follows the same policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onepoch.distributed import gather_batch
from onepoch.errors import ConfigError
from onepoch.losses import byol_loss
from onepoch.methods.common import (
    BackboneProjector,
    check_bn_views,
    cosine_momentum,
    ema_update_,
    frozen_copy,
    per_view,
    stack_views,
)
from onepoch.models import mlp, parse_mlp_spec


@dataclass
class BYOLConfig:
    projector: str | int = "4096-256"
    predictor: str | int = "4096-256"
    momentum: float = 0.996             # τ_base: the EMA momentum at the first step, 1 at the last
    bn_views: str = "separate"          # each view its own batch, as the official code

    def __post_init__(self):
        check_bn_views(self.bn_views)
        if parse_mlp_spec(self.predictor)[-1] != parse_mlp_spec(self.projector)[-1]:
            raise ConfigError(f"method.predictor must end in the projector's output size "
                              f"{parse_mlp_spec(self.projector)[-1]}, got {self.predictor!r}")
        if not 0 <= self.momentum <= 1:
            raise ConfigError(f"method.momentum must lie in [0, 1], got {self.momentum}")


class BYOL(BackboneProjector):
    """``forward(views)`` with view groups (V_g, B, C, h, w) of one size, V >= 2 in all → (loss,
    metrics, online backbone features of every view). ``after_optimizer_step`` moves the target."""

    name = "byol"

    def __init__(self, backbone: nn.Module, config: BYOLConfig):
        super().__init__(backbone, config.projector, config.bn_views)
        self.config = config
        self.predictor = mlp(parse_mlp_spec(config.projector)[-1], config.predictor)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        z, h = self.embed_views(views)
        p = per_view(self.predictor, z, self.bn_views).float()
        with torch.no_grad():
            target_h = per_view(self.target_backbone, stack_views(views), self.bn_views)
            target = per_view(self.target_projector, target_h, self.bn_views).float()
        loss = byol_loss(gather_batch(p, dim=1), gather_batch(target, dim=1))  # the global batch under DDP
        return loss, {"byol": loss.detach()}, h

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        tau = cosine_momentum(step, total_steps, self.config.momentum)
        ema_update_(self.target_backbone, self.backbone, tau)
        ema_update_(self.target_projector, self.projector, tau)
