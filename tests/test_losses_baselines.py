"""Baseline self-supervised losses against naive float64 versions written out with explicit loops."""

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


def compare(fast_fn, naive_fn, inputs: list[torch.Tensor], grad_of: list[int], rtol: float = 1e-5) -> None:
    """Values and gradients (w.r.t. inputs[i] for i in grad_of) of fast_fn (float32) and naive_fn (float64)."""
    x32 = [t.float().clone().requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
    x64 = [t.double().clone().requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
    fast, ref = fast_fn(*x32), naive_fn(*x64)
    assert fast.dtype == torch.float32 and fast.dim() == 0
    assert math.isclose(fast.item(), ref.item(), rel_tol=rtol, abs_tol=1e-6), (fast.item(), ref.item())
    g32 = torch.autograd.grad(fast, [x32[i] for i in grad_of])
    g64 = torch.autograd.grad(ref, [x64[i] for i in grad_of])
    for a, b in zip(g32, g64):
        assert b.abs().max() > 0
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item()), (a - b).abs().max()


# --- naive references ---------------------------------------------------------------------------


def naive_nt_xent(z, tau):
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


def naive_byol(p, z):
    v, b, _ = p.shape
    z = z.detach()
    pairs = []
    for i in range(v):
        for j in range(v):
            if i != j:
                pairs.append(mean([2 - 2 * unit(p[i, n]) @ unit(z[j, n]) for n in range(b)]))
    return mean(pairs)


def naive_columns_stats(x, unbiased):
    """Per column k of x [B, d]: (mean, variance)."""
    b, d = x.shape
    out = []
    for k in range(d):
        m = sum(x[n, k] for n in range(b)) / b
        var = sum((x[n, k] - m) ** 2 for n in range(b)) / (b - 1 if unbiased else b)
        out.append((m, var))
    return out


def naive_vicreg(z, sim_w, var_w, cov_w, gamma, eps):
    v, b, d = z.shape
    inv = mean([sum(((z[i, n] - z[j, n]) ** 2).sum() for n in range(b)) / (b * d)
                for i in range(v) for j in range(i + 1, v)])
    var_terms, cov_terms = [], []
    for i in range(v):
        stats = naive_columns_stats(z[i], unbiased=True)
        var_terms.append(mean([torch.relu(gamma - torch.sqrt(var + eps)) for _, var in stats]))
        off = 0.0
        for k in range(d):
            for m in range(d):
                if k != m:
                    c = sum((z[i, n, k] - stats[k][0]) * (z[i, n, m] - stats[m][0]) for n in range(b)) / (b - 1)
                    off = off + c ** 2
        cov_terms.append(off / d)
    var, cov = mean(var_terms), mean(cov_terms)
    return sim_w * inv + var_w * var + cov_w * cov, {"invariance": inv, "variance": var, "covariance": cov}


def naive_barlow(z, lam, eps):
    v, b, d = z.shape
    standard = []
    for i in range(v):
        stats = naive_columns_stats(z[i], unbiased=False)
        standard.append([[(z[i, n, k] - stats[k][0]) / torch.sqrt(stats[k][1] + eps) for k in range(d)]
                         for n in range(b)])
    pairs = []
    for i in range(v):
        for j in range(i + 1, v):
            loss = 0.0
            for k in range(d):
                for m in range(d):
                    c = sum(standard[i][n][k] * standard[j][n][m] for n in range(b)) / b
                    loss = loss + ((1 - c) ** 2 if k == m else lam * c ** 2)
            pairs.append(loss)
    return mean(pairs)


def naive_sinkhorn(scores, epsilon, iterations):
    b, k = scores.shape
    q = torch.exp((scores.double() - scores.max()) / epsilon).T.clone()
    q /= q.sum()
    for _ in range(iterations):
        for r in range(k):
            q[r] /= q[r].sum() * k
        for c in range(b):
            q[:, c] /= q[:, c].sum() * b
    return (q * b).T


def naive_swav(scores, codes, tau):
    v, b, kk = scores.shape
    pairs = []
    for i in range(codes.shape[0]):
        for j in range(v):
            if j != i:
                per_sample = []
                for n in range(b):
                    e = torch.exp(scores[j, n] / tau)
                    per_sample.append(-sum(codes[i, n, k] * torch.log(e[k] / e.sum()) for k in range(kk)))
                pairs.append(mean(per_sample))
    return mean(pairs)


def naive_ressl(student, teacher, queue, tau_s, tau_t):
    bank = [unit(q) for q in queue.detach()]
    terms = []
    for n in range(student.shape[0]):
        t, s = unit(teacher[n].detach()), unit(student[n])
        et = torch.stack([torch.exp(t @ q / tau_t) for q in bank])
        es = torch.stack([torch.exp(s @ q / tau_s) for q in bank])
        terms.append(-sum((et[m] / et.sum()) * torch.log(es[m] / es.sum()) for m in range(len(bank))))
    return mean(terms)


def decorrelated(b: int, d: int, std: float, seed: int) -> torch.Tensor:
    """[B, d] (d < B) with centred, mutually orthogonal columns of unbiased standard deviation ``std``."""
    basis = torch.cat([torch.ones(b, 1), randn(b, d, seed=seed)], dim=1).double()
    q = torch.linalg.qr(basis)[0][:, 1:]  # orthonormal and orthogonal to the ones vector
    return (q * std * math.sqrt(b - 1)).float()


# --- against the naive versions -----------------------------------------------------------------


@pytest.mark.parametrize("v,tau", [(2, 0.2), (3, 0.5)])
def test_nt_xent_matches_naive(v, tau):
    compare(lambda z: nt_xent_loss(z, tau), lambda z: naive_nt_xent(z, tau), [randn(v, 4, 5, seed=v)], [0])


@pytest.mark.parametrize("v", [2, 3])
def test_byol_matches_naive(v):
    compare(byol_loss, naive_byol, [randn(v, 4, 5, seed=10 + v), randn(v, 4, 5, seed=20 + v)], [0])


@pytest.mark.parametrize("v", [2, 3])
def test_vicreg_matches_naive(v):
    z = randn(v, 5, 4, seed=30 + v) * 0.7
    args = (25.0, 25.0, 1.0, 1.0, 1e-4)
    compare(lambda x: vicreg_loss(x, *args)[0], lambda x: naive_vicreg(x, *args)[0], [z], [0])
    _, parts = vicreg_loss(z.requires_grad_(True), *args)
    _, ref = naive_vicreg(z.double(), *args)
    for key in ("invariance", "variance", "covariance"):
        assert not parts[key].requires_grad
        assert math.isclose(parts[key].item(), ref[key].item(), rel_tol=1e-5, abs_tol=1e-7), key
    assert all(ref[key].item() > 0 for key in ref)  # each part is exercised


@pytest.mark.parametrize("v", [2, 3])
def test_barlow_twins_matches_naive(v):
    compare(lambda z: barlow_twins_loss(z, 0.05), lambda z: naive_barlow(z, 0.05, 1e-5),
            [randn(v, 6, 4, seed=40 + v)], [0])


def test_sinkhorn_matches_naive():
    s = randn(6, 4, seed=50)
    for iterations in (1, 3, 7):
        assert torch.allclose(sinkhorn_knopp(s, 0.3, iterations).double(), naive_sinkhorn(s, 0.3, iterations),
                              rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("v,vc", [(2, 2), (4, 2), (3, 1)])
def test_swav_matches_naive(v, vc):
    scores = randn(v, 5, 3, seed=60 + v)
    codes = torch.stack([sinkhorn_knopp(scores[i], 0.5) for i in range(vc)])
    compare(lambda s, c: swav_loss(s, c, 0.1), lambda s, c: naive_swav(s, c, 0.1), [scores, codes], [0])


def test_ressl_matches_naive():
    inputs = [randn(4, 5, seed=70), randn(4, 5, seed=71), randn(7, 5, seed=72)]
    compare(lambda s, t, q: ressl_loss(s, t, q, 0.1, 0.04), lambda s, t, q: naive_ressl(s, t, q, 0.1, 0.04),
            inputs, [0])


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
