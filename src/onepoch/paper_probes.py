"""The probes of EMP-SSL's official evaluation (Tong et al. 2023, their ``evaluate.py`` and ``func.py``),
reproduced for ``eval.protocol: paper``: numbers to set beside the paper's, never used to choose anything.

* :func:`paper_linear_probe`: ``nn.Linear(D, C)`` (PyTorch's default initialisation) on the raw features
  (no standardisation), cross-entropy, ``torch.optim.SGD(lr=0.03, momentum=0.9, weight_decay=5e-5)``,
  batches of 100 training rows in a fresh random order each epoch (the last partial batch dropped),
  ``CosineAnnealingLR(T_max=100)`` stepped once per epoch, 100 epochs, the test accuracy measured after
  every epoch. The official script prints the **best** of these (chosen on the test set) and the last;
  both are returned, the best labelled as chosen on test. (The official script averages the accuracies of
  test batches of 100; that is the accuracy over all test rows whenever their count is a multiple of 100,
  as for CIFAR and ImageNet-100, and this function reports the accuracy over all test rows.)
* :func:`paper_knn_probe`: the weighted k-NN of their ``WeightedKNNClassifier`` with its defaults: cosine
  similarity to every training row, the top ``k = 20``, weights ``exp(s / T)`` with ``T = 0.07``, no
  validation split.

The features the official code feeds them are the mean, over 128 patches drawn with the *training*
augmentation for train and test images alike, of EMP-SSL's ``pre_feature`` output with the network in eval
mode: onepoch's ``bag`` feature (:mod:`onepoch.eval`) with ``eval.bag_patches: 128``.

Randomness (initialisation and batch order) comes from one ``torch.Generator`` seeded with ``seed``; the
official code leaves it unseeded. ``init`` and ``epoch_orders`` let a test replay a recorded run exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from onepoch.errors import ConfigError
from onepoch.probes import _check_probe_inputs, _resolve_classes, accuracy, knn_predict

__all__ = ["PaperLinearResult", "paper_knn_probe", "paper_linear_probe"]

PAPER_LINEAR = {"lr": 0.03, "momentum": 0.9, "weight_decay": 5e-5, "batch_size": 100, "epochs": 100}
PAPER_KNN = {"k": 20, "temperature": 0.07}


@dataclass
class PaperLinearResult:
    """The official linear probe's outcome: test accuracy after the last epoch, the best test accuracy
    over the epochs (chosen on the test set, as the paper reports it) and its epoch (1-based), the
    test accuracy after every epoch, and the final classifier (``weight`` (C, D), ``bias`` (C,), on the CPU)."""

    last_test_acc: float
    best_test_acc: float
    best_epoch: int
    test_acc_per_epoch: list[float] = field(default_factory=list)
    weight: torch.Tensor | None = field(default=None, repr=False, compare=False)
    bias: torch.Tensor | None = field(default=None, repr=False, compare=False)


def _linear_init(dim: int, num_classes: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear``'s default initialisation: weight and bias uniform in ``[-1/sqrt(D), 1/sqrt(D)]``
    (``kaiming_uniform_(a=sqrt(5))`` gives exactly that bound for the weight)."""
    bound = 1.0 / dim ** 0.5
    weight = torch.rand(num_classes, dim, generator=generator).mul_(2 * bound).sub_(bound)
    bias = torch.rand(num_classes, generator=generator).mul_(2 * bound).sub_(bound)
    return weight, bias


def paper_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                       num_classes: int | None = None, seed: int = 0, lr: float = PAPER_LINEAR["lr"],
                       momentum: float = PAPER_LINEAR["momentum"],
                       weight_decay: float = PAPER_LINEAR["weight_decay"],
                       batch_size: int = PAPER_LINEAR["batch_size"], epochs: int = PAPER_LINEAR["epochs"],
                       init: tuple[torch.Tensor, torch.Tensor] | None = None,
                       epoch_orders: Sequence[torch.Tensor] | None = None) -> PaperLinearResult:
    """The official EMP-SSL linear probe (see the module docstring), on ``train_x.device`` in float32.

    Per epoch ``e`` (0-based): the training rows in the order ``epoch_orders[e]`` (default: a permutation
    drawn from the generator), cut into batches of ``batch_size`` (a last partial batch dropped), one SGD
    step per batch on the mean cross-entropy; then the cosine schedule steps, ``lr_e = lr (1 + cos(pi (e+1)
    / epochs)) / 2``; then the test accuracy is measured. ``init``: the initial ``(weight (C, D), bias (C,))``
    (default: ``nn.Linear``'s initialisation from the generator)."""
    _check_probe_inputs(train_x, train_y, test_x, test_y)
    if batch_size < 1 or epochs < 1:
        raise ConfigError(f"batch_size and epochs must be >= 1, got {batch_size} and {epochs}")
    n = train_x.shape[0]
    if n < batch_size:
        raise ConfigError(f"the paper's linear probe drops a last partial batch: {n} training rows are fewer than "
                          f"one batch of {batch_size}")
    num_classes = _resolve_classes(train_y, num_classes)
    if epoch_orders is not None and len(epoch_orders) != epochs:
        raise ConfigError(f"epoch_orders has {len(epoch_orders)} orders for {epochs} epochs")
    device = train_x.device
    generator = torch.Generator().manual_seed(seed)
    weight, bias = init if init is not None else _linear_init(train_x.shape[1], num_classes, generator)
    linear = torch.nn.Linear(train_x.shape[1], num_classes).to(device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    x = train_x.float()
    y = train_y.to(device, torch.int64)
    xt = test_x.to(device, torch.float32)
    yt = test_y.to(device, torch.int64)
    per_epoch = []
    for epoch in range(epochs):
        order = epoch_orders[epoch] if epoch_orders is not None else torch.randperm(n, generator=generator)
        order = order.to(device, torch.int64)
        for start in range(0, n - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            loss = F.cross_entropy(linear(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        with torch.no_grad():
            pred = torch.cat([linear(part).argmax(1) for part in xt.split(4096)])
        per_epoch.append(accuracy(pred, yt))
    best = max(range(epochs), key=lambda e: (per_epoch[e], -e))  # the first epoch reaching the best
    return PaperLinearResult(last_test_acc=per_epoch[-1], best_test_acc=per_epoch[best], best_epoch=best + 1,
                             test_acc_per_epoch=per_epoch, weight=linear.weight.detach().cpu(),
                             bias=linear.bias.detach().cpu())


def paper_knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                    num_classes: int | None = None, k: int = PAPER_KNN["k"],
                    temperature: float = PAPER_KNN["temperature"]) -> float:
    """Test accuracy of the official weighted k-NN: every training row is a neighbour candidate, cosine
    similarity, the top ``k``, class scores ``sum exp(s_i / T)``, the highest score wins."""
    _check_probe_inputs(train_x, train_y, test_x, test_y)
    num_classes = _resolve_classes(train_y, num_classes)
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes,
                       shortlist="off")  # float32 throughout, as the official code
    return accuracy(pred, test_y)
