"""SwAV (Caron et al. 2020): the code (Sinkhorn-Knopp assignment to prototypes) of one view is
predicted from every other view.

Backbone, projector (spec, paper ``2048-128``), L2-normalised embedding z, prototype scores
s = C·z with C the L2-normalised rows of a bias-free Linear (``prototypes`` of them, renormalised
after every step). Codes come from the first ``code_views`` views with
:func:`onepoch.losses.sinkhorn_knopp` (ε 0.05, 3 iterations); loss :func:`onepoch.losses.swav_loss`
(τ 0.1). Multi-crop: give view groups of several sizes (``views.groups``, large crops first).
``bn_views`` (default ``joint``, as the official code): consecutive views of one size go through the
backbone as one batch (one pass per resolution), then the projection head runs once on all views'
features together; ``separate``: each view through backbone and head as its own batch. The
prototypes get no update for the first ``freeze_prototypes_steps`` steps. With ``queue_size`` > 0
the embeddings of the code views of the last steps are kept and, once the queue is full, scored with
the batch in Sinkhorn-Knopp (for small batches), as in the paper; the queue is a buffer, so it is in
every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onepoch.distributed import gather_batch
from onepoch.errors import ConfigError
from onepoch.losses import sinkhorn_knopp, swav_loss
from onepoch.methods.common import BackboneProjector, check_bn_views, per_view, stack_views
from onepoch.models import parse_mlp_spec


@dataclass
class SwAVConfig:
    projector: str | int = "2048-128"
    prototypes: int = 3000
    temperature: float = 0.1
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    code_views: int = 2                 # codes from the first views (the large crops)
    freeze_prototypes_steps: int = 0
    queue_size: int = 0                 # embeddings per code view; 0: no queue
    bn_views: str = "joint"             # one backbone batch per resolution, the head on all, as the official code

    def __post_init__(self):
        parse_mlp_spec(self.projector)
        check_bn_views(self.bn_views)
        for key in ("prototypes", "sinkhorn_iterations", "code_views"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("temperature", "sinkhorn_epsilon"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"method.{key} must be > 0, got {getattr(self, key)}")
        for key in ("freeze_prototypes_steps", "queue_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0, got {getattr(self, key)}")


class SwAV(BackboneProjector):
    """``forward(views)`` with view groups (V_g, B, C, h_g, w_g), sizes may differ, the first
    ``code_views`` views (in group order) at the training size → (loss, metrics, backbone features of
    every view). Hooks: prototypes frozen early (``before_optimizer_step``), renormalised after each
    step (``after_optimizer_step``)."""

    name = "swav"

    def __init__(self, backbone: nn.Module, config: SwAVConfig):
        super().__init__(backbone, config.projector, config.bn_views)
        self.config = config
        dim = parse_mlp_spec(config.projector)[-1]
        self.prototypes = nn.Linear(dim, config.prototypes, bias=False)
        self._normalize_prototypes()
        self.register_buffer("queue", torch.zeros(config.code_views, config.queue_size, dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        c = self.config
        num_views = sum(v.shape[0] for v in views)
        if not 2 <= num_views or c.code_views > num_views:
            raise ValueError(f"SwAV needs >= 2 views and at least code_views={c.code_views}, got {num_views}")
        h = self._backbone_features(views)                     # [V, B, F]
        z = F.normalize(per_view(self.projector, h, self.bn_views).float(), dim=-1)  # [V, B, d]
        z = gather_batch(z, dim=1)  # the global batch under DDP: Sinkhorn and the queue see every rank's
        scores = self.prototypes(z.to(self.prototypes.weight.dtype)).float()  # [V, B, K]
        codes = torch.stack([self._codes(i, scores[i]) for i in range(c.code_views)])
        loss = swav_loss(scores, codes, c.temperature)
        if c.queue_size:
            self._enqueue(z[:c.code_views])
        return loss, {"swav": loss.detach()}, h.flatten(0, 1)

    def _backbone_features(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Backbone features [V, B, F] of the view groups: ``joint``, one pass per run of consecutive
        groups of one size; ``separate``, one pass per view."""
        if self.bn_views == "separate":
            return torch.cat([per_view(self.backbone, group, "separate") for group in views])
        runs: list[list[torch.Tensor]] = []
        for group in views:
            if runs and runs[-1][-1].shape[-2:] == group.shape[-2:]:
                runs[-1].append(group)
            else:
                runs.append([group])
        return torch.cat([per_view(self.backbone, stack_views(run), "joint") for run in runs])

    @torch.no_grad()
    def _codes(self, view: int, scores: torch.Tensor) -> torch.Tensor:
        c = self.config
        b = scores.shape[0]
        if c.queue_size and int(self.queue_count) >= c.queue_size:
            queued = self.prototypes(self.queue[view].to(self.prototypes.weight.dtype)).float()
            scores = torch.cat([scores, queued])
        return sinkhorn_knopp(scores, c.sinkhorn_epsilon, c.sinkhorn_iterations)[:b]

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor) -> None:
        """Shift the queue by B and put the batch's code-view embeddings [Vc, B, d] first."""
        b = min(z.shape[1], self.config.queue_size)
        self.queue.copy_(torch.cat([z[:, :b].to(self.queue.dtype), self.queue[:, :self.queue.shape[1] - b]], dim=1))
        self.queue_count.add_(b)

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if step < self.config.freeze_prototypes_steps:
            self.prototypes.weight.grad = None

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        if step >= self.config.freeze_prototypes_steps:  # (frozen ones did not move)
            self._normalize_prototypes()
