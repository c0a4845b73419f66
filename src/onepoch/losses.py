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

    as the official code (``patch_sim · loss_contract + loss_TCR`` with loss_TCR = −mean R). Returns the
    loss and its parts (``invariance``, ``tcr`` = mean R, both detached).
    """
    inv = patch_invariance(z)
    tcr = total_coding_rate(z, eps).mean()
    loss = invariance_weight * inv - tcr
    return loss, {"invariance": inv.detach(), "tcr": tcr.detach()}


# --- Baseline self-supervised losses -------------------------------------------------------------


def _float32_region(t: torch.Tensor) -> torch.autocast:
    """A region with autocast off on ``t``'s device, so that the maths below stays in float32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _check_views(name: str, z: torch.Tensor, min_views: int = 2, min_batch: int = 1) -> None:
    """Raise ValueError unless ``z`` has shape [V, B, d] with V >= min_views and B >= min_batch."""
    if z.dim() != 3:
        raise ValueError(f"{name} expects embeddings of shape [V, B, d], got {tuple(z.shape)}")
    if z.shape[0] < min_views:
        raise ValueError(f"{name} needs at least {min_views} views (dim 0), got shape {tuple(z.shape)}")
    if z.shape[1] < min_batch:
        raise ValueError(f"{name} needs a batch of at least {min_batch} (dim 1), got shape {tuple(z.shape)}")


def _check_positive(name: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} needs {key} > 0, got {value}")


def _off_diagonal_mask(n: int, device: torch.device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _view_pairs(v: int) -> tuple[list[int], list[int]]:
    """Indices (i, j) of the unordered pairs of distinct views, i < j."""
    first, second = torch.triu_indices(v, v, offset=1).tolist()
    return first, second


def nt_xent_loss(z: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1) generalised to V >= 2 views, z of shape [V, B, d]:

    s_ak = cos(z_a, z_k) / τ over all N = V·B embeddings;
    L = mean over anchors a and positives p (the other V−1 views of a's image) of
        −log( exp(s_ap) / Σ_{k≠a} exp(s_ak) ).

    With V = 2 this is exactly the paper's L = (1/2N) Σ_k [ℓ(2k−1, 2k) + ℓ(2k, 2k−1)] (and lightly's
    NTXentLoss). SimCLR's official code sums the two directions before averaging over the batch, twice
    this value: a constant factor, which LARS's trust ratio all but cancels.
    """
    _check_views("nt_xent_loss", z)
    _check_positive("nt_xent_loss", temperature=temperature)
    v, b, _ = z.shape
    with _float32_region(z):
        zn = F.normalize(z.float().reshape(v * b, -1), dim=-1)
        sim = (zn @ zn.T) / temperature
        not_self = _off_diagonal_mask(v * b, z.device)
        log_denominator = torch.logsumexp(sim.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
        image = torch.arange(b, device=z.device).repeat(v)
        positive = (image[:, None] == image[None, :]) & not_self
        return (log_denominator - sim)[positive].mean()


def byol_loss(p: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """BYOL's symmetrised loss (Grill et al. 2020, eq. 2 and §3.1), p and z_target of shape [V, B, d]:

    ℓ(p, z) = mean_b ‖p̄_b − z̄_b‖² = mean_b ( 2 − 2·cos(p_b, sg(z_b)) )   (x̄ = x/‖x‖, sg: stop-gradient)
    L = mean over unordered pairs of views {i, j} of ( ℓ(p_i, z_j) + ℓ(p_j, z_i) )

    With V = 2 this is the paper's L^BYOL = L + L̃ (§3.1), as in the official code, which sums the
    two directions' regression losses and averages over the batch. It is twice the mean over
    ordered pairs of views. The target is detached here.
    """
    _check_views("byol_loss", p)
    if z_target.shape != p.shape:
        raise ValueError(f"byol_loss needs p and z_target of the same shape, got {tuple(p.shape)} "
                         f"and {tuple(z_target.shape)}")
    v = p.shape[0]
    with _float32_region(p):
        pn = F.normalize(p.float(), dim=-1)
        zn = F.normalize(z_target.detach().float(), dim=-1)
        cos = torch.einsum("ibd,jbd->ij", pn, zn) / p.shape[1]  # [V, V]: mean_b cos(p_i, z_j)
        return 2.0 * (2.0 - 2.0 * cos[_off_diagonal_mask(v, p.device)].mean())


def vicreg_loss(z: torch.Tensor, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0,
                gamma: float = 1.0, eps: float = 1e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes et al. 2022, eqs. 1-6, as in the official code) for z of shape [V, B, d]:

    s(Z, Z') = (1/(B·d)) Σ_b ‖z_b − z'_b‖²                                  (invariance, MSE)
    v(Z) = (1/d) Σ_k relu(γ − sqrt(Var_b(z_{·k}) + ε))                       (variance, unbiased Var)
    c(Z) = (1/d) Σ_{k≠l} C(Z)_{kl}²,  C(Z) = (1/(B−1)) Σ_b (z_b − z̄)(z_b − z̄)ᵀ  (covariance)

    For two views: ℓ(Z, Z') = λ·s(Z, Z') + μ·[v(Z) + v(Z')]/2 + ν·[c(Z) + c(Z')]: the official code
    (and lightly's VICRegLoss) averages the two variance terms and adds the two covariance terms; the
    paper's eq. 6 writes μ·[v(Z) + v(Z')], but λ = μ = 25, ν = 1 are the code's weights.
    For V views, L = mean over pairs i < j of ℓ(Z_i, Z_j); every view is in V − 1 pairs, so

    L = λ · mean_{i<j} s(Z_i, Z_j) + μ · mean_i v(Z_i) + ν · 2·mean_i c(Z_i),

    which is ℓ itself for V = 2. Returns L and the parts that λ, μ, ν multiply: ``invariance``
    (mean s), ``variance`` (mean v), ``covariance`` (2·mean c, i.e. c(Z) + c(Z') for two views), detached.
    """
    _check_views("vicreg_loss", z, min_batch=2)
    _check_positive("vicreg_loss", eps=eps)
    v, b, d = z.shape
    with _float32_region(z):
        zf = z.float()
        first, second = _view_pairs(v)
        invariance = F.mse_loss(zf[first], zf[second])  # every pair has the same size: mean of pair means
        std = torch.sqrt(zf.var(dim=1, unbiased=True) + eps)  # [V, d]
        variance = F.relu(gamma - std).mean()
        centred = zf - zf.mean(dim=1, keepdim=True)
        cov = centred.transpose(1, 2) @ centred / (b - 1)  # [V, d, d]
        per_view = (cov.pow(2).sum(dim=(1, 2)) - torch.diagonal(cov, dim1=1, dim2=2).pow(2).sum(-1)) / d
        covariance = 2.0 * per_view.mean()
        loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    parts = {"invariance": invariance.detach(), "variance": variance.detach(), "covariance": covariance.detach()}
    return loss, parts


def barlow_twins_loss(z: torch.Tensor, lambda_offdiag: float = 5e-3, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, eqs. 1-2) for z of shape [V, B, d]:

    ẑ = (z − mean_b z) / sqrt(Var_b z + ε)   (per view and dimension; biased Var, as BatchNorm without affine)
    C = ẑ_aᵀ ẑ_b / B,   L_ab = Σ_i (1 − C_ii)² + λ · Σ_{i≠j} C_ij²

    averaged over the unordered pairs of views a < b (L_ab = L_ba, since C_ba = C_abᵀ). With V = 2 this
    is the official code's loss (BatchNorm1d without affine, ε 1e-5, C divided by B; its default λ
    is 0.0051, the paper's 5e-3).
    """
    _check_views("barlow_twins_loss", z, min_batch=2)
    _check_positive("barlow_twins_loss", eps=eps)
    v, b, d = z.shape
    with _float32_region(z):
        zf = z.float()
        zs = (zf - zf.mean(dim=1, keepdim=True)) / torch.sqrt(zf.var(dim=1, unbiased=False, keepdim=True) + eps)
        first, second = _view_pairs(v)
        c = zs[first].transpose(1, 2) @ zs[second] / b  # [pairs, d, d]
        diag = torch.diagonal(c, dim1=1, dim2=2)
        on = (1.0 - diag).pow(2).sum(-1)
        off = c.pow(2).sum(dim=(1, 2)) - diag.pow(2).sum(-1)
        return (on + lambda_offdiag * off).mean()


def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's equipartitioned codes (Caron et al. 2020, eq. 3-4) for prototype scores of shape [B, K]:

    Q = exp(scores / ε)ᵀ (K × B, after subtracting the maximum), normalised to sum 1; then ``iterations``
    rounds of: rows (prototypes) scaled to sum 1/K, columns (samples) scaled to sum 1/B.
    Returns B·Qᵀ, shape [B, K]: each sample's row sums to 1 (each prototype's column to about B/K).
    As the official code's ``distributed_sinkhorn`` on one process (subtracting the maximum changes
    nothing after the first normalisation). No gradient flows through it.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn_knopp expects scores of shape [B, K], got {tuple(scores.shape)}")
    _check_positive("sinkhorn_knopp", epsilon=epsilon)
    if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs a whole number of iterations >= 1, got {iterations}")
    b, k = scores.shape
    with torch.no_grad(), _float32_region(scores):
        s = scores.detach().float()
        q = torch.exp((s - s.max()) / epsilon).T  # [K, B]
        q = q / q.sum()
        for _ in range(int(iterations)):
            q = q / (q.sum(dim=1, keepdim=True) * k)
            q = q / (q.sum(dim=0, keepdim=True) * b)
        return (q * b).T


def swav_loss(scores: torch.Tensor, codes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, eqs. 1-2), scores of shape [V, B, K], codes [Vc, B, K]:

    the codes q_i are the (Sinkhorn) assignments of the first Vc views; p_j = softmax(scores_j / τ);
    L = mean over code views i < Vc and views j ≠ i of mean_b ( −Σ_k q_{i,b,k} · log p_{j,b,k} ).

    As the official code: for each code view the mean over the V − 1 other views, then the mean over
    the code views. The codes are detached here.
    """
    _check_views("swav_loss", scores)
    if codes.dim() != 3 or codes.shape[1:] != scores.shape[1:] or not 1 <= codes.shape[0] <= scores.shape[0]:
        raise ValueError(f"swav_loss needs codes of shape [Vc, B, K] with 1 <= Vc <= V matching scores "
                         f"{tuple(scores.shape)}, got {tuple(codes.shape)}")
    _check_positive("swav_loss", temperature=temperature)
    v, b, _ = scores.shape
    vc = codes.shape[0]
    with _float32_region(scores):
        log_p = F.log_softmax(scores.float() / temperature, dim=-1)
        q = codes.detach().float()
        cross = -torch.einsum("ibk,jbk->ij", q, log_p) / b  # [Vc, V]
        other = _off_diagonal_mask(v, scores.device)[:vc]
        return cross[other].mean()


def ressl_loss(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, tau_student: float = 0.1,
               tau_teacher: float = 0.04) -> torch.Tensor:
    """ReSSL's relational loss (Zheng et al. 2021, eqs. 2-4), student and teacher [B, d], queue [Q, d]:

    p_t = softmax(t·Qᵀ / τ_t) (no gradient), p_s = softmax(s·Qᵀ / τ_s), all vectors L2-normalised;
    L = mean_b ( −Σ_q p_t · log p_s ).

    As the official code (softmax of the teacher's logits / τ_t against log-softmax of the student's / τ_s
    over the queue). The teacher and the queue (a memory of past teacher embeddings) are detached here.
    """
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"ressl_loss needs student and teacher of the same shape [B, d], got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if queue.dim() != 2 or queue.shape[0] < 1 or queue.shape[1] != student.shape[1]:
        raise ValueError(f"ressl_loss needs a queue of shape [Q, d] with d = {student.shape[1]}, "
                         f"got {tuple(queue.shape)}")
    _check_positive("ressl_loss", tau_student=tau_student, tau_teacher=tau_teacher)
    with _float32_region(student):
        bank = F.normalize(queue.detach().float(), dim=-1)
        with torch.no_grad():
            p_t = F.softmax(F.normalize(teacher.detach().float(), dim=-1) @ bank.T / tau_teacher, dim=-1)
        log_p_s = F.log_softmax(F.normalize(student.float(), dim=-1) @ bank.T / tau_student, dim=-1)
        return -(p_t * log_p_s).sum(-1).mean()
