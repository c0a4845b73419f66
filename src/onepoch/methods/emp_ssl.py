"""EMP-SSL (Tong, Chen, Ma, LeCun 2023): many fixed-size patches per image, total coding rate plus
patch invariance.

Heads as in the paper's code: ``pre_feature`` = Linear(feature→4096) + BN + ReLU (the representation
that the bag-of-features evaluation averages over patches), then ``projection`` = Linear(4096→4096)
+ BN + ReLU + Linear(4096→1024), L2-normalised. Loss: :func:`onepoch.losses.emp_ssl_loss`.

``bn_views`` (default ``joint``): the official code concatenates all patches of the batch and runs
the network once on the n·B patches, so BatchNorm statistics span all patches; ``separate`` runs
each patch index (B patches, one per image) as its own batch.

``bn_chunks`` (default 1, with ``joint``): BatchNorm statistics over that many contiguous pieces of the
patch-major batch, what the official code computes on that many GPUs: it wraps the network in
``nn.DataParallel``, which splits the n·B rows into one piece per GPU (e.g. 4 GPUs, 20 patches: 5 patch
indices per piece) and keeps the running statistics of the first piece (``in_bn_chunks``). The loss
sees every row, so on one GPU (``bn_chunks=1``) nothing changes. The official README does not say how many
GPUs its runs used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onepoch.distributed import gather_batch
from onepoch.errors import ConfigError
from onepoch.losses import emp_ssl_loss
from onepoch.methods.common import check_bn_views, per_view, stack_views
from onepoch.models import mlp, parse_mlp_spec


@dataclass
class EmpSSLConfig:
    pre_feature: str | int = "4096"      # Linear+BN+ReLU layers after the backbone (the bag-of-features layer)
    projector: str | int = "4096-1024"   # then hidden Linear+BN+ReLU layers and a final Linear
    eps: float = 0.2                 # ε of the total coding rate, scale d/(B·ε)
    invariance_weight: float = 200.0  # λ
    bn_views: str = "joint"          # all patches in one batch, as the official code
    bn_chunks: int = 1               # BatchNorm over this many pieces of that batch: nn.DataParallel on this many GPUs

    def __post_init__(self):
        check_bn_views(self.bn_views)
        if not isinstance(self.bn_chunks, int) or isinstance(self.bn_chunks, bool) or self.bn_chunks < 1:
            raise ConfigError(f"method.bn_chunks must be an integer >= 1, got {self.bn_chunks!r}")
        if self.bn_chunks > 1 and self.bn_views != "joint":
            raise ConfigError(f"method.bn_chunks={self.bn_chunks} splits the joint batch; it needs "
                              f"method.bn_views=joint, got {self.bn_views!r}")
        parse_mlp_spec(self.pre_feature)
        parse_mlp_spec(self.projector)
        if not self.eps > 0:
            raise ConfigError(f"method.eps must be > 0, got {self.eps}")
        if self.invariance_weight < 0:
            raise ConfigError(f"method.invariance_weight must be >= 0, got {self.invariance_weight}")


class EmpSSL(nn.Module):
    """``forward(views)`` with patch groups (n_g, B, C, h, w) of one size → (loss, metrics, backbone
    features of every patch, patch-major)."""

    name = "emp_ssl"

    def __init__(self, backbone: nn.Module, config: EmpSSLConfig):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.pre_feature = mlp(backbone.feature_dim, config.pre_feature, last_bn=True, last_relu=True)
        self.pre_feature_dim = parse_mlp_spec(config.pre_feature)[-1]
        self.projection = mlp(self.pre_feature_dim, config.projector)

    feature_layers = ("backbone", "pre_feature", "projector")

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layers an evaluation can read: ``backbone``, ``pre_feature`` and ``projector``."""
        h = self.backbone(x)
        pre = self.pre_feature(h)
        return {"backbone": h, "pre_feature": pre, "projector": self.projection(pre)}

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        # bn_chunks cuts every module's rows the same way: BatchNorm is the only layer that mixes rows
        mode, chunks = self.config.bn_views, self.config.bn_chunks
        h = per_view(self.backbone, stack_views(views), mode, chunks)
        z = per_view(self.projection, per_view(self.pre_feature, h, mode, chunks), mode, chunks)
        z = gather_batch(F.normalize(z.float(), dim=-1), dim=1)  # the global batch under DDP
        loss, parts = emp_ssl_loss(z, eps=self.config.eps, invariance_weight=self.config.invariance_weight)
        return loss, parts, h.flatten(0, 1)
