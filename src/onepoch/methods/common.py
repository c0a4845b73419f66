"""What the joint-embedding methods share: a backbone with a projector from a spec, view groups
stacked into (V, B, ...) and passed through the networks jointly or view by view (``bn_views``), and
the EMA target networks of BYOL and ReSSL."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from onepoch.errors import ConfigError
from onepoch.models import mlp

BN_VIEWS = ("joint", "separate")


def check_bn_views(value: str) -> None:
    """Raise ConfigError unless ``value`` is a ``method.bn_views`` choice."""
    if value not in BN_VIEWS:
        raise ConfigError(f"method.bn_views must be one of {', '.join(BN_VIEWS)}, got {value!r}")


def per_view(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bn_views: str,
             bn_chunks: int = 1) -> torch.Tensor:
    """``fn`` (a batch of rows in, rows out) on views ``x`` of shape (V, B, ...), giving (V, B, ...).

    ``joint``: one call on all V·B rows, so BatchNorm normalises with statistics over every view
    (with ``bn_chunks`` > 1, over each of that many pieces of them: :func:`in_bn_chunks`, which needs
    ``fn`` to be a module); ``separate``: one call per view, so each view's B rows are their own batch
    (BatchNorm statistics of one view at a time), as two separate forward passes of two views do.
    """
    check_bn_views(bn_views)
    v, b = x.shape[:2]
    if bn_views == "joint":
        out = fn(x.flatten(0, 1)) if bn_chunks == 1 else in_bn_chunks(fn, x.flatten(0, 1), bn_chunks)
    else:
        out = torch.cat([fn(x[i]) for i in range(v)])
    return out.unflatten(0, (v, b))


def in_bn_chunks(module: nn.Module, rows: torch.Tensor, chunks: int) -> torch.Tensor:
    """``module`` on ``rows`` split into ``chunks`` contiguous pieces (``rows.chunk(chunks)``), each
    piece its own BatchNorm batch, outputs concatenated in order: what ``nn.DataParallel`` over
    ``chunks`` GPUs computes, which scatters the batch that way and runs one replica per piece.

    Running statistics are updated from the first piece only, as DataParallel keeps those of the
    replica on its first device (the others are discarded). ``chunks=1`` is ``module(rows)``.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    pieces = rows.chunk(chunks)
    if len(pieces) == 1:
        return module(rows)
    out = [module(pieces[0])]
    with _running_statistics_kept(module):
        out += [module(piece) for piece in pieces[1:]]
    return torch.cat(out)


@contextmanager
def _running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers of ``module`` normalise with batch statistics but leave
    their running statistics and batch count as they are (momentum 0: running ← 1·running + 0·batch)."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in layers]
    try:
        for m in layers:
            m.momentum = 0.0
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


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
    [V, B, d] and the backbone features (V·B, F) they came from (view-major: rows v·B .. v·B+B−1 are
    view v), all views in one pass through backbone and projector (``bn_views="joint"``) or one view
    per pass (``"separate"``), see :func:`per_view`.
    """

    def __init__(self, backbone: nn.Module, projector: str | int, bn_views: str = "joint"):
        super().__init__()
        check_bn_views(bn_views)
        self.backbone = backbone
        self.projector = mlp(backbone.feature_dim, projector)
        self.bn_views = bn_views

    feature_layers = ("backbone", "projector")

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layers an evaluation can read: the backbone output and the projector's."""
        h = self.backbone(x)
        return {"backbone": h, "projector": self.projector(h)}

    def embed_views(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = per_view(self.backbone, stack_views(views), self.bn_views)
        z = per_view(self.projector, h, self.bn_views)
        return z.float(), h.flatten(0, 1)
