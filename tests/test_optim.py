import math

import pytest
import torch
from torch import nn

from onepoch.errors import ConfigError
from onepoch.optim import LARS, build_optimizer, set_learning_rate, warmup_cosine


def test_lars_step_matches_the_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(4))
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(4, 3) * 10, torch.randn(4)
    lr, wd, trust, mu = 0.5, 1e-2, 0.005, 0.9
    opt = LARS([{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lars": False}], lr=lr, momentum=mu,
               weight_decay=wd, trust_coefficient=trust)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    ratio = trust * w0.norm() / (gw.norm() + wd * w0.norm())
    scale = min(ratio.item() / lr, 1.0)
    g = (gw + wd * w0) * scale
    expected_w = w0 - lr * (g + mu * g)  # Nesterov, first step: buf = g
    assert torch.allclose(w.detach(), expected_w, atol=1e-6)
    assert scale < 1  # the trust ratio lowered the step here
    assert torch.allclose(b.detach(), b0 - lr * (gb + mu * gb), atol=1e-6)  # 1-D: plain SGD, no decay


def test_lars_matches_torch_sgd_with_the_trust_ratio_over_several_steps():
    """Five steps with changing gradients and learning rates, momentum on: the LARS group equals
    torch.optim.SGD (Nesterov) fed the trust-ratio-scaled, weight-decayed gradient; the 1-D group
    equals torch.optim.SGD itself (no decay, no trust ratio). A tensor that misses its gradient at
    one step keeps its momentum buffer untouched, as in SGD."""
    torch.manual_seed(0)
    shapes = [(8, 3), (5, 5, 3, 3), (16,)]
    lr, wd, trust, mu = 0.5, 1e-2, 0.005, 0.9
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = LARS([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0, "lars": False}], lr=lr,
               momentum=mu, weight_decay=wd, trust_coefficient=trust)
    sgd = torch.optim.SGD(ref, lr=lr, momentum=mu, nesterov=True)
    scales = []
    for step in range(5):
        step_lr = lr * (1 - 0.15 * step)
        for group in opt.param_groups:
            group["lr"] = step_lr
        for group in sgd.param_groups:
            group["lr"] = step_lr
        grads = [torch.randn(s) * (10, 1e-3, 1)[i] for i, s in enumerate(shapes)]  # clipped, unclipped, 1-D
        for i, (p, q, g) in enumerate(zip(ours, ref, grads)):
            if step == 2 and i == 1:  # no gradient for this tensor at this step
                p.grad = q.grad = None
                continue
            p.grad = g.clone()
            if i < 2:  # LARS: g + wd*w, scaled by min(trust*|w| / (|g| + wd*|w|) / lr, 1)
                w_norm, g_norm = q.detach().norm(), g.norm()
                scale = min((trust * w_norm / (g_norm + wd * w_norm)).item() / step_lr, 1.0)
                scales.append(scale)
                q.grad = (g + wd * q.detach()) * scale
            else:
                q.grad = g.clone()
        opt.step()
        sgd.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert min(scales) < 1 and max(scales) == 1  # both sides of the clip were exercised
    assert ours[0].grad is not None and torch.equal(ours[0].grad, grads[0])  # gradients are left as they were


def test_lars_clip_never_raises_the_step():
    w = nn.Parameter(torch.full((2, 2), 100.0))
    opt = LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0, trust_coefficient=0.005)
    w.grad = torch.full((2, 2), 1e-3)  # tiny gradient: trust ratio >> lr
    opt.step()
    assert torch.allclose(w.detach(), torch.full((2, 2), 100.0 - 0.1 * 1e-3))


def test_build_optimizer_splits_one_dimensional_parameters():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for name in ("lars", "sgd", "adamw"):
        opt = build_optimizer(net.named_parameters(), name, lr=0.1, weight_decay=0.5)
        many, one = opt.param_groups
        assert [p.ndim for p in many["params"]] == [2]
        assert len(one["params"]) == 3 and one["weight_decay"] == 0.0
        assert many["weight_decay"] == 0.5
    with pytest.raises(ConfigError, match="did you mean 'lars'"):
        build_optimizer(net.named_parameters(), "lasr", lr=0.1, weight_decay=0.0)


def test_norm_bias_lr_scale_sets_the_one_dimensional_group_lr():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for name in ("lars", "sgd", "adamw"):
        opt = build_optimizer(net.named_parameters(), name, lr=0.1, weight_decay=0.0, norm_bias_lr_scale=0.024)
        set_learning_rate(opt, 0.2)
        assert [g["lr"] for g in opt.param_groups] == [0.2, pytest.approx(0.2 * 0.024)]
    # the 1-D step is scaled: one SGD step without momentum moves a bias by lr * scale * grad
    bias = nn.Parameter(torch.zeros(3))
    opt = build_optimizer([("b", bias)], "sgd", lr=1.0, weight_decay=0.0, momentum=0.0, norm_bias_lr_scale=0.5)
    set_learning_rate(opt, 1.0)
    bias.grad = torch.ones(3)
    opt.step()
    assert torch.equal(bias.detach(), torch.full((3,), -0.5))


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, final_ratio=0.1) == pytest.approx(0.1)
    values = [warmup_cosine(s, 100, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert warmup_cosine(3, 100, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 100)))
