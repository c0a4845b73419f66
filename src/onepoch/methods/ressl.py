"""ReSSL (Zheng et al. 2021): the student's similarities to a memory of past teacher embeddings,
sharpened less (τ_s 0.1), learn the teacher's (τ_t 0.04) for another view of the image.

The teacher (backbone + projector) is an EMA of the student, τ going from ``momentum`` to 1 on a
cosine over the run, and sees weakly augmented views: the first view group is the teacher's (crop
and flip only in the paper), the other groups are the student's strongly augmented views (see
``configs/ressl/``). Loss :func:`onepoch.losses.ressl_loss`, averaged over the student views, against
the teacher embedding of the first weak view. After the loss the teacher embeddings of the batch
replace the oldest entries of the queue (``queue_size`` L2-normalised vectors, random at the start;
a buffer, so it is in every checkpoint).

``bn_views`` (default ``separate``): in the official code the student and the teacher each get one
view (a batch of B images) per forward pass; with several student views, ``separate`` keeps that
(each view its own batch) and ``joint`` runs them in one batch. The teacher embeds only the first
weak view, one batch of B either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onepoch.distributed import gather_batch
from onepoch.errors import ConfigError
from onepoch.losses import ressl_loss
from onepoch.methods.common import BackboneProjector, check_bn_views, cosine_momentum, ema_update_, frozen_copy
from onepoch.models import parse_mlp_spec


@dataclass
class ReSSLConfig:
    projector: str | int = "4096-512"
    queue_size: int = 65536
    tau_student: float = 0.1
    tau_teacher: float = 0.04
    momentum: float = 0.99              # the EMA momentum at the first step, 1 at the last
    bn_views: str = "separate"          # each student view its own batch, as the official code

    def __post_init__(self):
        parse_mlp_spec(self.projector)
        check_bn_views(self.bn_views)
        if self.queue_size < 1:
            raise ConfigError(f"method.queue_size must be >= 1, got {self.queue_size}")
        for key in ("tau_student", "tau_teacher"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"method.{key} must be > 0, got {getattr(self, key)}")
        if not 0 <= self.momentum <= 1:
            raise ConfigError(f"method.momentum must lie in [0, 1], got {self.momentum}")


def enqueue_(queue: torch.Tensor, pointer: torch.Tensor, items: torch.Tensor) -> None:
    """Write ``items`` [n, d] into the ring buffer ``queue`` [Q, d] at ``pointer`` (wrapping), and
    advance the pointer (a 0-d long tensor) by n mod Q. With n >= Q only the last Q items are kept."""
    q = queue.shape[0]
    items = items.detach()[-q:].to(queue.dtype)
    n = items.shape[0]
    at = int(pointer)
    first = min(n, q - at)
    queue[at:at + first] = items[:first]
    queue[:n - first] = items[first:]
    pointer.fill_((at + n) % q)


class ReSSL(BackboneProjector):
    """``forward(views)`` with view groups (V_g, B, C, h, w) of one size: group 0 the teacher's weak
    views, the others the student's → (loss, metrics, student backbone features of its views)."""

    name = "ressl"

    def __init__(self, backbone: nn.Module, config: ReSSLConfig):
        super().__init__(backbone, config.projector, config.bn_views)
        self.config = config
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        dim = parse_mlp_spec(config.projector)[-1]
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, dim), dim=-1))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        if len(views) < 2:
            raise ValueError("ReSSL needs two view groups: the teacher's weak views, then the student's "
                             "(views.groups in the recipe)")
        z, h = self.embed_views(views[1:])
        z = gather_batch(z, dim=1)  # the global batch under DDP (the queue too)
        with torch.no_grad():
            weak = views[0][0]
            teacher = gather_batch(self.target_projector(self.target_backbone(weak)).float())
        losses = [ressl_loss(z[i], teacher, self.queue, self.config.tau_student, self.config.tau_teacher)
                  for i in range(z.shape[0])]
        loss = torch.stack(losses).mean()
        with torch.no_grad():
            # KL(p_t || p_s) = loss − H(p_t): how far the student is from the teacher (the loss itself
            # also moves with the teacher's entropy as the queue fills).
            p_t = F.softmax(F.normalize(teacher, dim=-1) @ F.normalize(self.queue.float(), dim=-1).T
                            / self.config.tau_teacher, dim=-1)
            entropy = -(p_t * p_t.clamp_min(1e-30).log()).sum(-1).mean()
            enqueue_(self.queue, self.queue_pointer, F.normalize(teacher, dim=-1))
        return loss, {"ressl": loss.detach(), "kl": loss.detach() - entropy}, h

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        tau = cosine_momentum(step, total_steps, self.config.momentum)
        ema_update_(self.target_backbone, self.backbone, tau)
        ema_update_(self.target_projector, self.projector, tau)
