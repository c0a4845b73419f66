"""Optimizers and the learning-rate schedule.

- :class:`LARS`: SGD with (Nesterov) momentum whose per-tensor step is scaled by the layer-wise
  trust ratio of You et al. 2017, clipped so it can only lower the step (NVIDIA's LARC "clip" mode,
  as EMP-SSL's code uses). Parameters with one dimension (biases, norm scales) get neither the trust
  ratio nor weight decay.
- :func:`build_optimizer`: ``lars`` / ``sgd`` / ``adamw`` with the 1-D parameters split off.
- :func:`warmup_cosine`: the learning-rate factor at a step, linear warmup then cosine decay.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from onepoch.config import suggest
from onepoch.errors import ConfigError

OPTIMIZERS = ("lars", "sgd", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD + momentum + LARS trust ratio (clipped).

    For a tensor w with gradient g in a group with ``lars=True``:
        g ← g + wd·w
        r = trust · ‖w‖ / (‖g_raw‖ + wd·‖w‖)        (1 when ‖w‖ or ‖g_raw‖ is 0)
        g ← g · min(r / lr, 1)
    then the SGD step: buf ← μ·buf + g;  w ← w − lr·(g + μ·buf) (Nesterov) or w − lr·buf.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.005, nesterov: bool = True):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS needs lr, momentum, weight_decay >= 0 and trust_coefficient > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lars=True,
                        trust_coefficient=trust_coefficient, nesterov=nesterov)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: list[torch.Tensor]) -> None:
        """One step of every tensor of a group with a handful of ``torch._foreach_*`` kernels (no
        per-tensor Python loop of small kernels); the maths is the class docstring's."""
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        step = torch._foreach_add(grads, params, alpha=wd) if wd else grads  # never modifies p.grad
        if group["lars"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm)
            ok = (w_norm > 0) & (g_norm > 0)
            scale = torch.where(ok, torch.clamp(ratio / max(lr, 1e-12), max=1.0), torch.ones_like(ratio))
            step = torch._foreach_mul(step, list(scale.to(params[0].dtype).unbind()))
        if mu:
            fresh = [i for i, p in enumerate(params) if "momentum_buffer" not in self.state[p]]
            for i in fresh:  # first step of a tensor: buf = g
                self.state[params[i]]["momentum_buffer"] = step[i].clone()
            old = [i for i in range(len(params)) if i not in set(fresh)]
            if old:
                bufs = [self.state[params[i]]["momentum_buffer"] for i in old]
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, [step[i] for i in old])
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            step = torch._foreach_add(step, bufs, alpha=mu) if group["nesterov"] else bufs
        torch._foreach_add_(params, step, alpha=-lr)


def split_decay(params: Iterable[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(tensors with >1 dimension, 1-D tensors such as biases and norm scales), trainable only."""
    many, one = [], []
    for _, p in params:
        if p.requires_grad:
            (many if p.ndim > 1 else one).append(p)
    return many, one


def build_optimizer(named_params, name: str, *, lr: float, weight_decay: float, momentum: float = 0.9,
                    trust_coefficient: float = 0.005, betas: tuple[float, float] = (0.9, 0.999),
                    norm_bias_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``named_params``; 1-D parameters get no weight decay (and no LARS).

    Each param group carries ``lr_scale`` (1 for the weights, ``norm_bias_lr_scale`` for the 1-D
    parameters): a schedule sets ``group["lr"] = lr_at_step * group["lr_scale"]``
    (:func:`set_learning_rate`).
    """
    many, one = split_decay(named_params)
    groups = [{"params": many, "lr_scale": 1.0},
              {"params": one, "weight_decay": 0.0, "lr_scale": norm_bias_lr_scale}]
    if name == "lars":
        groups[1]["lars"] = False
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ConfigError(f"unknown optim.name {name!r}{suggest(name, OPTIMIZERS)}; choose one of: {', '.join(OPTIMIZERS)}")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each param group's lr to ``lr`` times its ``lr_scale`` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_ratio: float = 0.0) -> float:
    """Learning-rate factor at ``step`` (0-based): (step+1)/warmup during warmup, then
    final + (1 − final)·½(1 + cos(π·t)), t going from 0 to 1 over the remaining steps."""
    if total_steps <= 0:
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
