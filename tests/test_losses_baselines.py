"""Baseline self-supervised losses beyond the two-view reference values (tests/test_reference_losses.py):
their generalisations to V views, ReSSL (which lightly lacks), exact special cases, stop-gradients,
dtypes and input checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from onepoch.losses import (
    barlow_twins_loss,
    byol_loss,
    nt_xent_loss,
    ressl_loss,
    sinkhorn_knopp,
    swav_loss,
    vicreg_loss,
)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum())


def mean(terms: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(terms).sum() / len(terms)


# --- more than two views ------------------------------------------------------------------------
# The two-view losses are checked against lightly in test_reference_losses.py; here each stated
# generalisation to V views is checked against its definition in terms of the two-view loss.


def pair_mean(fn, *inputs: torch.Tensor) -> torch.Tensor:
    """Mean over the unordered pairs of views i < j of fn(inputs restricted to views [i, j])."""
    v = inputs[0].shape[0]
    return mean([fn(*(x[[i, j]] for x in inputs)) for i in range(v) for j in range(i + 1, v)])


def compare(fast_fn, ref_fn, inputs: list[torch.Tensor], grad_of: list[int]) -> None:
    """Values and gradients (w.r.t. inputs[i] for i in grad_of) of two computations on float64 inputs
    (our losses compute in float32 inside, hence the float32-sized tolerances)."""
    x = [t.double().clone().requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
    fast, ref = fast_fn(*x), ref_fn(*x)
    assert math.isclose(fast.item(), ref.item(), rel_tol=1e-5), (fast.item(), ref.item())
    g_fast = torch.autograd.grad(fast, [x[i] for i in grad_of])
    g_ref = torch.autograd.grad(ref, [x[i] for i in grad_of])
    for a, b in zip(g_fast, g_ref):
        assert b.abs().max() > 0
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("v", [3, 4])
def test_vicreg_of_v_views_is_the_mean_over_pairs(v):
    z = randn(v, 6, 4, seed=30 + v) * 0.7
    compare(lambda x: vicreg_loss(x)[0], lambda x: pair_mean(lambda y: vicreg_loss(y)[0], x), [z], [0])
    _, parts = vicreg_loss(z)
    for key in ("invariance", "variance", "covariance"):
        expected = pair_mean(lambda y: vicreg_loss(y)[1][key], z)
        assert math.isclose(parts[key].item(), expected.item(), rel_tol=1e-5), key
        assert parts[key].item() > 0 and not parts[key].requires_grad


@pytest.mark.parametrize("v", [3, 4])
def test_barlow_twins_of_v_views_is_the_mean_over_pairs(v):
    compare(lambda z: barlow_twins_loss(z, 0.05), lambda z: pair_mean(lambda y: barlow_twins_loss(y, 0.05), z),
            [randn(v, 6, 4, seed=40 + v)], [0])


@pytest.mark.parametrize("v", [3, 4])
def test_byol_of_v_views_is_the_mean_over_pairs(v):
    compare(byol_loss, lambda p, z: pair_mean(byol_loss, p, z),
            [randn(v, 4, 5, seed=10 + v), randn(v, 4, 5, seed=20 + v)], [0])


def naive_nt_xent(z, tau):
    """The docstring's formula with loops: every anchor against each of its positives, over all others."""
    v, b, _ = z.shape
    emb = [unit(z[i, n]) for i in range(v) for n in range(b)]
    image = [n for _ in range(v) for n in range(b)]
    terms = []
    for a in range(v * b):
        den = sum(torch.exp(emb[a] @ emb[k] / tau) for k in range(v * b) if k != a)
        for p in range(v * b):
            if p != a and image[p] == image[a]:
                terms.append(-torch.log(torch.exp(emb[a] @ emb[p] / tau) / den))
    return mean(terms)


def test_nt_xent_of_three_views_matches_its_formula():
    compare(lambda z: nt_xent_loss(z, 0.5), lambda z: naive_nt_xent(z, 0.5), [randn(3, 4, 5, seed=3)], [0])


@pytest.mark.parametrize("v,vc", [(4, 2), (3, 1), (3, 3)])
def test_swav_of_v_views_averages_each_code_views_partners(v, vc):
    """For each code view i, the mean over the V − 1 other views of the cross-entropy, then the mean over i
    (the official code's loop), written with torch's soft-label cross-entropy."""
    scores = randn(v, 5, 3, seed=60 + v)
    codes = torch.stack([sinkhorn_knopp(scores[i], 0.5) for i in range(vc)]).double()

    def official(s):
        per_code = [mean([F.cross_entropy(s[j] / 0.1, codes[i]) for j in range(v) if j != i]) for i in range(vc)]
        return mean(per_code)

    compare(lambda s: swav_loss(s, codes, 0.1), official, [scores], [0])


def test_ressl_matches_soft_label_cross_entropy():
    """ReSSL's loss is the cross-entropy of the student's relation logits against the teacher's softmax:
    torch's soft-label cross_entropy on L2-normalised embeddings and queue, float64."""
    student, teacher, queue = randn(4, 5, seed=70), randn(4, 5, seed=71), randn(7, 5, seed=72)

    def reference(s, t, q):
        bank = F.normalize(q.detach(), dim=-1)
        p_t = F.softmax(F.normalize(t.detach(), dim=-1) @ bank.T / 0.04, dim=-1)
        return F.cross_entropy(F.normalize(s, dim=-1) @ bank.T / 0.1, p_t)

    compare(lambda s, t, q: ressl_loss(s, t, q, 0.1, 0.04), reference, [student, teacher, queue], [0])


def decorrelated(b: int, d: int, std: float, seed: int) -> torch.Tensor:
    """[B, d] (d < B) with centred, mutually orthogonal columns of unbiased standard deviation ``std``."""
    basis = torch.cat([torch.ones(b, 1), randn(b, d, seed=seed)], dim=1).double()
    q = torch.linalg.qr(basis)[0][:, 1:]  # orthonormal and orthogonal to the ones vector
    return (q * std * math.sqrt(b - 1)).float()


# --- special cases ------------------------------------------------------------------------------


def test_nt_xent_identical_orthogonal_views_near_zero():
    b, d, tau = 4, 6, 0.05
    onehot = torch.eye(d)[:b]
    z = torch.stack([onehot, onehot])
    expected = math.log(1 + (2 * b - 2) * math.exp(-1 / tau))  # one positive at 1/τ, all others at 0
    assert expected < 1e-7
    assert 0 <= nt_xent_loss(z, tau).item() < 1e-6
    assert nt_xent_loss(randn(2, b, d, seed=80), tau).item() > 1.0
    three = torch.stack([onehot, onehot, onehot])
    assert nt_xent_loss(three, tau).item() < nt_xent_loss(randn(3, b, d, seed=81), tau).item()


def test_byol_target_gets_no_gradient_and_identical_views_give_zero():
    p = randn(2, 4, 5, seed=90).requires_grad_(True)
    target = randn(2, 4, 5, seed=91).requires_grad_(True)
    loss = byol_loss(p, target)
    loss.backward()
    assert target.grad is None and p.grad is not None
    same = randn(4, 5, seed=92)
    assert abs(byol_loss(torch.stack([same, same]), torch.stack([same, same])).item()) < 1e-6


def test_vicreg_decorrelated_and_spread_embeddings():
    b, d = 8, 5
    wide = torch.stack([decorrelated(b, d, 2.0, seed=100), decorrelated(b, d, 2.0, seed=101)])
    _, parts = vicreg_loss(wide)
    assert abs(parts["covariance"].item()) < 1e-6
    assert parts["variance"].item() == 0.0  # every std is 2 >= γ = 1
    assert parts["invariance"].item() > 0
    narrow = torch.stack([decorrelated(b, d, 0.5, seed=100)] * 2)
    _, parts = vicreg_loss(narrow)
    assert abs(parts["covariance"].item()) < 1e-6 and parts["invariance"].item() == 0.0
    assert math.isclose(parts["variance"].item(), 1 - math.sqrt(0.25 + 1e-4), rel_tol=1e-4)
    _, parts = vicreg_loss(torch.ones(2, b, d))  # collapsed: std = sqrt(eps)
    assert math.isclose(parts["variance"].item(), 1 - 0.01, rel_tol=1e-5)


def test_barlow_twins_identical_decorrelated_views_near_zero():
    z = decorrelated(8, 7, 3.0, seed=110)
    assert barlow_twins_loss(torch.stack([z, z])).item() < 1e-6
    assert barlow_twins_loss(torch.stack([z, z, z])).item() < 1e-6
    assert barlow_twins_loss(randn(2, 8, 7, seed=111)).item() > 0.5


def test_sinkhorn_marginals():
    b, k = 12, 4
    s = randn(b, k, seed=120)
    q = sinkhorn_knopp(s, epsilon=0.5, iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(b), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((k,), b / k), atol=1e-3)
    q3 = sinkhorn_knopp(s.requires_grad_(True))
    assert q3.shape == (b, k) and q3.dtype == torch.float32 and not q3.requires_grad
    assert torch.allclose(q3.sum(1), torch.ones(b), atol=1e-6)
    assert (q3 >= 0).all()
    cosine = torch.tanh(s)  # scores in [-1, 1], default ε = 0.05: exp(50 / ε) would overflow unless the
    shifted = sinkhorn_knopp(cosine + 50)  # maximum is subtracted first
    assert torch.isfinite(shifted).all()
    assert torch.allclose(shifted, sinkhorn_knopp(cosine), atol=1e-4)


def test_ressl_teacher_and_queue_get_no_gradient():
    student, teacher, queue = (randn(*shape, seed=130 + i).requires_grad_(True)
                               for i, shape in enumerate([(4, 5), (4, 5), (7, 5)]))
    ressl_loss(student, teacher, queue).backward()
    assert teacher.grad is None and queue.grad is None and student.grad is not None


def test_swav_codes_get_no_gradient():
    scores = randn(2, 5, 3, seed=140).requires_grad_(True)
    codes = F.softmax(randn(2, 5, 3, seed=141), dim=-1).requires_grad_(True)
    swav_loss(scores, codes).backward()
    assert codes.grad is None and scores.grad is not None


# --- dtypes and shapes --------------------------------------------------------------------------


def all_losses(x: torch.Tensor) -> list[torch.Tensor]:
    """Every loss on embeddings of shape [2, 6, 4] (and its slices)."""
    codes = torch.stack([sinkhorn_knopp(x[i]) for i in range(2)])
    return [nt_xent_loss(x), byol_loss(x, x.flip(0)), vicreg_loss(x)[0], barlow_twins_loss(x),
            swav_loss(x, codes), ressl_loss(x[0], x[1], x[1].flip(0))]


def test_bf16_inputs_give_float32_outputs():
    x = randn(2, 6, 4, seed=150)
    reference = all_losses(x)
    xb = x.bfloat16()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for out, ref in zip(all_losses(xb), reference):
                assert out.dtype == torch.float32
                assert math.isclose(out.item(), ref.item(), rel_tol=0.1, abs_tol=0.05)
            assert sinkhorn_knopp(xb[0]).dtype == torch.float32
            assert all(out.dtype == torch.float32 for out in vicreg_loss(xb)[1].values())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 input stays float32 maths under autocast
        for out, ref in zip(all_losses(x), reference):
            assert out.dtype == torch.float32 and math.isclose(out.item(), ref.item(), rel_tol=1e-5)


def test_wrong_shapes_raise():
    one_view, flat = torch.randn(1, 4, 3), torch.randn(4, 3)
    for fn in (nt_xent_loss, barlow_twins_loss, lambda z: vicreg_loss(z)):
        for bad in (one_view, flat):
            with pytest.raises(ValueError, match="shape"):
                fn(bad)
    with pytest.raises(ValueError, match="views"):
        nt_xent_loss(one_view)
    with pytest.raises(ValueError, match="batch"):
        vicreg_loss(torch.randn(2, 1, 3))
    with pytest.raises(ValueError, match="batch"):
        barlow_twins_loss(torch.randn(2, 1, 3))
    with pytest.raises(ValueError, match="views"):
        byol_loss(one_view, one_view)
    with pytest.raises(ValueError, match="same shape"):
        byol_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        sinkhorn_knopp(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(flat, iterations=0)
    with pytest.raises(ValueError, match="codes"):
        swav_loss(torch.randn(2, 4, 3), torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match="codes"):
        swav_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="views"):
        swav_loss(one_view, one_view)
    with pytest.raises(ValueError, match="same shape"):
        ressl_loss(flat, torch.randn(5, 3), flat)
    with pytest.raises(ValueError, match="queue"):
        ressl_loss(flat, flat, torch.randn(6, 5))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.randn(2, 4, 3), temperature=0.0)
