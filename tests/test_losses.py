"""EMP-SSL's loss: the total coding rate against the d x d log-determinant in float64 (the other side
of Sylvester's identity from the one computed), exact special cases, autocast and parts. Values and
gradients on random patches are compared with lightly in test_reference_losses.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from onepoch.losses import emp_ssl_loss, patch_invariance, total_coding_rate


def naive_tcr(z: torch.Tensor, eps: float) -> torch.Tensor:
    """½ logdet(I_d + d/(B·eps) ZᵀZ) with the d x d matrix, in float64."""
    b, d = z.shape
    z = z.double()
    return 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (b * eps) * z.T @ z)


@pytest.mark.parametrize("b,d", [(8, 32), (40, 12), (16, 16)])
def test_tcr_matches_naive_logdet_values_and_gradients(b, d):
    g = torch.Generator().manual_seed(b * 100 + d)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_(True)
    z64 = z.detach().double().requires_grad_(True)
    fast = total_coding_rate(z, eps=0.2)
    ref = naive_tcr(z64, 0.2)
    assert abs(fast.item() - ref.item()) <= 1e-4 * abs(ref.item())
    fast.backward()
    ref.backward()
    rel = (z.grad.double() - z64.grad).norm() / z64.grad.norm()
    assert rel.item() <= 1e-4


def test_tcr_batched_equals_per_group():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(5, 10, 24, generator=g), dim=-1)
    batched = total_coding_rate(z, eps=0.5)
    assert batched.shape == (5,)
    for i in range(5):
        assert torch.allclose(batched[i].double(), naive_tcr(z[i], 0.5), rtol=1e-4)


def test_tcr_is_float32_under_autocast():
    z = F.normalize(torch.randn(16, 8), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = total_coding_rate(z.bfloat16())
    assert r.dtype == torch.float32
    assert torch.allclose(r.double(), naive_tcr(z.bfloat16().float(), 0.2), rtol=1e-4)


def test_tcr_special_cases():
    # Identical rows: rank one, R = ½ log(1 + d/(B eps) · B) exactly.
    b, d, eps = 10, 6, 0.2
    z = F.normalize(torch.ones(b, d), dim=1)
    assert math.isclose(total_coding_rate(z, eps).item(), 0.5 * math.log(1 + d / eps), rel_tol=1e-5)
    # Orthonormal rows (B = d): ZᵀZ = I, R = d/2 · log(1 + d/(B eps)).
    q = torch.linalg.qr(torch.randn(d, d))[0]
    assert math.isclose(total_coding_rate(q, eps).item(), 0.5 * d * math.log(1 + 1 / eps), rel_tol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        total_coding_rate(torch.randn(3))
    with pytest.raises(ValueError, match="eps"):
        total_coding_rate(torch.randn(3, 4), eps=0)


def test_invariance_special_cases():
    # Identical patches: every cosine to the mean is 1. (Values and gradients on random patches are
    # checked against lightly in test_reference_losses.py.)
    same = torch.randn(1, 3, 5).expand(4, 3, 5)
    assert math.isclose(patch_invariance(same).item(), -1.0, rel_tol=1e-6)
    # Patches a + u and a − u (a ⟂ u, unit vectors): their mean is a, each at 45° to it.
    a, u = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([a + u, a - u]).view(2, 1, 2)
    assert math.isclose(patch_invariance(z).item(), -1 / math.sqrt(2), rel_tol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        patch_invariance(torch.randn(3, 4))


def test_emp_ssl_loss_parts_are_detached_and_weighted():
    z = F.normalize(torch.randn(4, 8, 16), dim=-1).requires_grad_(True)
    loss, parts = emp_ssl_loss(z, eps=0.2, invariance_weight=0.0)
    assert not parts["tcr"].requires_grad and not parts["invariance"].requires_grad
    assert math.isclose(loss.item(), -parts["tcr"].item(), rel_tol=1e-6)  # λ = 0: the loss is −TCR
