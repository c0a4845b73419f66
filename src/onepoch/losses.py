"""Loss functions, each a pure function of embeddings with its paper's formula in the docstring."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _logdet_spd(a: torch.Tensor) -> torch.Tensor:
    """log det of symmetric positive-definite matrices (..., m, m) via Cholesky: 2·Σ log diag L."""
    chol = torch.linalg.cholesky(a)
    return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def total_coding_rate(z: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """Total coding rate (Ma et al. 2007; EMP-SSL eq. 2) of embeddings ``z``.

    For z of shape [B, d]: R(Z) = ½ · logdet(I_d + d / (B·eps) · ZᵀZ). A leading dimension
    [n, B, d] gives n rates, shape [n]. ``eps`` is as in EMP-SSL's code (the scale is d/(B·eps)).

    Computed through whichever Gram matrix is smaller, using Sylvester's identity
    logdet(I_d + c·ZᵀZ) = logdet(I_B + c·ZZᵀ), with a Cholesky factorisation in float32, also under
    autocast.
    """
    if z.dim() not in (2, 3):
        raise ValueError(f"total_coding_rate expects z of shape [B, d] or [n, B, d], got {tuple(z.shape)}")
    if not eps > 0:
        raise ValueError(f"total_coding_rate needs eps > 0, got {eps}")
    b, d = z.shape[-2], z.shape[-1]
    c = d / (b * eps)
    with torch.autocast(device_type=z.device.type, enabled=False):
        zf = z.float()
        gram = zf @ zf.transpose(-1, -2) if b <= d else zf.transpose(-1, -2) @ zf
        m = gram.shape[-1]
        eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
        return 0.5 * _logdet_spd(eye + c * gram)


def patch_invariance(z: torch.Tensor) -> torch.Tensor:
    """EMP-SSL's invariance term for n patch embeddings per image, z of shape [n, B, d]:

    −(1/n) · Σ_i mean_b cos(z_{i,b}, z̄_b),  z̄_b = (1/n) Σ_i z_{i,b}

    z̄ is neither normalised nor detached (as in the paper's code); lower is more invariant.
    """
    if z.dim() != 3:
        raise ValueError(f"patch_invariance expects z of shape [n, B, d], got {tuple(z.shape)}")
    mean = z.mean(0, keepdim=True)
    return -F.cosine_similarity(z, mean.expand_as(z), dim=-1).mean()


def emp_ssl_loss(z: torch.Tensor, *, eps: float = 0.2, invariance_weight: float = 200.0
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EMP-SSL objective (Tong et al. 2023, eq. 4) for z of shape [n, B, d]:

    L = λ · invariance(Z) − (1/n) · Σ_i R(Z_i)

    Returns the loss and its parts (``invariance``, ``tcr`` = mean R, both detached).
    """
    inv = patch_invariance(z)
    tcr = total_coding_rate(z, eps).mean()
    loss = invariance_weight * inv - tcr
    return loss, {"invariance": inv.detach(), "tcr": tcr.detach()}
