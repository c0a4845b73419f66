"""Evaluation probes on frozen features already in memory: linear, MLP and weighted k-NN.

All take ``(train_x, train_y, test_x, test_y)``: ``x`` is ``(N, D)`` floating (float16, bfloat16 or
float32; work is done in float32, batch by batch), ``y`` is ``(N,)`` integer class ids in
``[0, num_classes)``. Hyper-parameters are chosen on a stratified validation split of the training
set; the test set is touched once, at the very end (``test_x`` and ``test_y`` are read only there).

* :func:`linear_probe`: softmax regression on standardised features, trained with a seeded Adam;
  weight decay and epoch count chosen on validation, then retrained on the whole training set.
* :func:`mlp_probe`: the non-linear probe of FFCV-SSL, ``Linear -> BatchNorm1d -> ReLU -> Dropout ->
  Linear`` on standardised features, trained with Adam; hidden width, dropout, weight decay and epoch
  count chosen on validation, then retrained on the whole training set.
* :func:`knn_probe` / :func:`knn_predict`: the weighted k-NN classifier of Wu et al. 2018
  (InstDisc): cosine similarity, top-k neighbours, weights ``exp(sim / T)``; :func:`knn_probe` may
  sweep several ``k`` and ``T``, chosen on validation.

Everything random comes from explicit ``torch.Generator`` objects seeded with ``seed``; the global
RNG is never used.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from onepoch.errors import ConfigError
from onepoch.precision import native_bf16
from onepoch.progress import progress as make_bar

__all__ = [
    "ProbeResult",
    "accuracy",
    "knn_predict",
    "knn_probe",
    "linear_probe",
    "mlp_probe",
    "stratified_split",
]

_CHUNK = 4096  # rows per chunk when converting / standardising / evaluating whole feature matrices
_STD_FLOOR = 1e-6  # a feature whose std is below this is only centred (divided by 1)
_SHORTLIST_MARGIN = 16  # a bfloat16 k-NN shortlist keeps k + this many candidates for float32 re-scoring


@dataclass
class ProbeResult:
    """Outcome of a probe: test accuracy of the final classifier, validation accuracy of the chosen
    setting, the chosen hyper-parameters, and every setting tried (each a dict with its ``val_acc``)."""

    test_acc: float
    val_acc: float
    chosen: dict
    grid: list[dict] = field(default_factory=list)
    name: str = ""


# --------------------------------------------------------------------------------------------------
# checks and small helpers


def _check_features(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ConfigError(f"{what} must be a 2-D tensor (N, D), got {_describe(x)}")
    if not x.is_floating_point():
        raise ConfigError(f"{what} must be floating point, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ConfigError(f"{what} is empty")


def _check_labels(y: torch.Tensor, what: str, n: int | None = None) -> None:
    if not isinstance(y, torch.Tensor) or y.dim() != 1:
        raise ConfigError(f"{what} must be a 1-D tensor of class ids, got {_describe(y)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ConfigError(f"{what} must be an integer tensor, got dtype {y.dtype}")
    if n is not None and y.shape[0] != n:
        raise ConfigError(f"{what} has {y.shape[0]} labels but the features have {n} rows")


def _check_probe_inputs(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                        test_y: torch.Tensor) -> None:
    """Both feature matrices 2-D with the same width, each with one label per row."""
    _check_features(train_x, "train_x")
    _check_labels(train_y, "train_y", train_x.shape[0])
    _check_features(test_x, "test_x")
    _check_labels(test_y, "test_y", test_x.shape[0])
    if test_x.shape[1] != train_x.shape[1]:
        raise ConfigError(f"test_x has {test_x.shape[1]} features but train_x has {train_x.shape[1]}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}"
    return type(x).__name__


def _resolve_classes(train_y: torch.Tensor, num_classes: int | None) -> int:
    """``num_classes`` checked against the training labels, or ``max(train_y) + 1`` when None."""
    lo, hi = int(train_y.min()), int(train_y.max())
    if lo < 0:
        raise ConfigError(f"train_y has a negative class id ({lo})")
    if num_classes is None:
        return hi + 1
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if hi >= num_classes:
        raise ConfigError(f"train_y has class id {hi} but num_classes is {num_classes}")
    return int(num_classes)


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``pred == labels`` (two 1-D tensors of the same, non-zero length)."""
    if pred.shape != labels.shape or pred.dim() != 1:
        raise ConfigError(f"accuracy needs two 1-D tensors of equal length, got shapes "
                          f"{tuple(pred.shape)} and {tuple(labels.shape)}")
    if pred.shape[0] == 0:
        raise ConfigError("accuracy of an empty set is undefined")
    return int((pred == labels.to(pred.device)).sum()) / pred.shape[0]


# --------------------------------------------------------------------------------------------------
# split


def _check_grid_values(weight_decays: list[float], epochs: list[int], lr: float) -> None:
    """The checks linear_probe and mlp_probe share: weight decays, epoch counts (sorted), lr."""
    if any(not math.isfinite(w) or w < 0 for w in weight_decays):
        raise ConfigError(f"weight decays must be finite and >= 0, got {weight_decays}")
    if epochs[0] < 1:
        raise ConfigError(f"epoch counts must be >= 1, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be > 0, got {lr}")


def _train_val_rows(train_y: torch.Tensor, val_fraction: float, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels on the CPU, training rows, validation rows) of the stratified split; an empty
    validation split is a ConfigError."""
    y_cpu = train_y.detach().to("cpu", torch.int64)
    tr, va = stratified_split(y_cpu, val_fraction, seed)
    if va.shape[0] == 0:
        raise ConfigError("the validation split is empty: every class has a single training sample")
    return y_cpu, tr, va


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train_idx, val_idx)`` (sorted, int64, on ``labels.device``) of a per-class split.

    Class ``c`` with ``n_c`` samples puts ``round(val_fraction * n_c)`` of them, clipped to
    ``[1, n_c - 1]``, in validation (a class with one sample stays in training). Which samples go
    is drawn with ``torch.Generator().manual_seed(seed)``: same seed, same split.
    """
    _check_labels(labels, "labels")
    _check_val_fraction(val_fraction)
    n = labels.shape[0]
    if n == 0:
        raise ConfigError("labels is empty")
    y = labels.detach().to("cpu", torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    # a random order, then stably grouped by class: a uniform random permutation within each class
    order = torch.randperm(n, generator=gen)
    order = order[torch.sort(y[order], stable=True).indices]
    _, counts = torch.unique_consecutive(y[order], return_counts=True)
    n_val = torch.floor(counts.double() * val_fraction + 0.5).long()
    n_val = torch.minimum(torch.clamp(n_val, min=1), counts - 1)  # 0 for a class of one sample
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - torch.repeat_interleave(starts, counts)
    is_val = rank < torch.repeat_interleave(n_val, counts)
    train_idx = torch.sort(order[~is_val]).values
    val_idx = torch.sort(order[is_val]).values
    return train_idx.to(labels.device), val_idx.to(labels.device)


# --------------------------------------------------------------------------------------------------
# linear probe


def _standardised_copy(x: torch.Tensor, order: torch.Tensor, n_stat: int,
                       out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``out[j] = (x[order[j]] - mean) / std`` in float32, mean and (population) std over the first
    ``n_stat`` rows of ``out``; returns ``(mean, std)`` (float32; a std below 1e-6 is replaced by 1).

    Written chunk by chunk into ``out`` (no other full-size copy); statistics accumulate in float64.
    """
    d = x.shape[1]
    order = order.to(x.device)
    for s in range(0, order.shape[0], _CHUNK):
        out[s:s + _CHUNK].copy_(x.index_select(0, order[s:s + _CHUNK]))
    total = torch.zeros(d, dtype=torch.float64, device=out.device)
    for s in range(0, n_stat, _CHUNK):
        total += out[s:min(s + _CHUNK, n_stat)].sum(0, dtype=torch.float64)
    mean = total / n_stat
    sq = torch.zeros(d, dtype=torch.float64, device=out.device)
    for s in range(0, n_stat, _CHUNK):
        sq += (out[s:min(s + _CHUNK, n_stat)].double() - mean).square_().sum(0)
    std = (sq / n_stat).sqrt_()
    std = torch.where(std > _STD_FLOOR, std, torch.ones_like(std))
    mean32, std32 = mean.float(), std.float()
    for s in range(0, order.shape[0], _CHUNK):
        out[s:s + _CHUNK].sub_(mean32).div_(std32)
    return mean32, std32


class _Heads:
    """``H`` independent softmax-regression heads stacked into one ``(H*C, D)`` layer, trained together by
    one ``torch.optim.Adam`` (betas 0.9, 0.999, eps 1e-8) on the gradient of

        sum_h [ mean_batch CE(W_h z + b_h, y) + weight_decay[h] / 2 * ||W_h||^2 ]

    (the bias is not decayed). The heads share minibatches, so one matrix product serves them all, and the
    sum's gradient with respect to head ``h`` is that head's own: each head follows the run it would follow
    alone. Starts at zero."""

    def __init__(self, dim: int, num_classes: int, weight_decays: Sequence[float], lr: float,
                 device: torch.device):
        rows = len(weight_decays) * num_classes
        self.num_classes = num_classes
        self.weight = torch.zeros(rows, dim, device=device)
        self.bias = torch.zeros(rows, device=device)
        decay = torch.tensor(weight_decays, dtype=torch.float32, device=device).repeat_interleave(num_classes)
        self.decay = decay[:, None]
        self.optimizer = torch.optim.Adam([self.weight, self.bias], lr=lr, fused=True)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H)`` argmax class of every head for the rows ``x`` ``(B, D)``."""
        logits = torch.addmm(self.bias, x, self.weight.t())
        return logits.view(x.shape[0], -1, self.num_classes).argmax(-1)

    @torch.no_grad()
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One Adam step of every head on the minibatch ``(x, y)``. The gradient is written out rather than
        taken by autograd (which was slower in a trial on the demo's features, with the same choices and
        accuracies): for the mean cross-entropy ``dL/dlogits = (softmax(logits) - onehot(y)) / B``, so
        ``dL/dW = dL/dlogits^T x + weight_decay * W`` and ``dL/db = sum_rows dL/dlogits``."""
        b = x.shape[0]
        logits = torch.addmm(self.bias, x, self.weight.t()).view(b, -1, self.num_classes)
        g = torch.softmax(logits, dim=-1)
        g[torch.arange(b, device=x.device), :, y] -= 1.0
        g = g.view(b, -1).div_(b)
        self.weight.grad = torch.addmm(self.weight * self.decay, g.t(), x)
        self.bias.grad = g.sum(0)
        self.optimizer.step()

    def correct(self, x: torch.Tensor, y: torch.Tensor) -> list[int]:
        """Number of rows of ``x`` each head classifies as ``y``."""
        correct = torch.zeros(self.decay.shape[0] // self.num_classes, dtype=torch.int64, device=x.device)
        for s in range(0, x.shape[0], _CHUNK):
            correct += (self.predict(x[s:s + _CHUNK]) == y[s:s + _CHUNK, None]).sum(0)
        return [int(c) for c in correct]


def _train_linear(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, weight_decays: Sequence[float],
                  epochs: int, lr: float, batch_size: int, gen: torch.Generator,
                  checkpoints: Sequence[int] = (), on_checkpoint=None, progress: bool = False,
                  desc: str = "linear probe") -> _Heads:
    """Train one head per weight decay on all rows of ``x`` for ``epochs`` epochs at a constant learning
    rate; ``on_checkpoint(epoch, heads)`` after each epoch in ``checkpoints``.

    Minibatches are the contiguous row blocks ``x[i*B:(i+1)*B]`` (the caller has shuffled the rows),
    visited in a fresh order drawn from ``gen`` every epoch. With a constant learning rate the heads at
    epoch ``e`` are exactly those of an ``e``-epoch run.
    """
    heads = _Heads(x.shape[1], num_classes, weight_decays, lr, x.device)
    n_batches = math.ceil(x.shape[0] / batch_size)
    bar = None
    if progress:
        bar = make_bar(total=epochs * n_batches, desc=desc, unit="step")
    try:
        for epoch in range(1, epochs + 1):
            for i in torch.randperm(n_batches, generator=gen).tolist():
                s = i * batch_size
                heads.train_step(x[s:s + batch_size], y[s:s + batch_size])
                if bar is not None:
                    bar.update(1)
            if epoch in checkpoints and on_checkpoint is not None:
                on_checkpoint(epoch, heads)
    finally:
        if bar is not None:
            bar.close()
    return heads


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 num_classes: int | None = None, val_fraction: float = 0.1,
                 weight_decays: Sequence[float] = (0.0, 1e-5, 1e-4, 1e-3),
                 epochs: Sequence[int] = (10, 25, 50), lr: float = 1e-3, batch_size: int = 1024,
                 seed: int = 0, device: torch.device | str | None = None, progress: bool = False) -> ProbeResult:
    """Linear probe: softmax regression ``argmax(W z + b)`` on standardised features ``z = (x - mean) / std``.

    1. ``stratified_split(train_y, val_fraction, seed)``; mean/std from the train part only.
    2. One Adam run of ``max(epochs)`` epochs per weight decay (all weight decays trained side by side
       on the same minibatches; loss ``mean CE + wd / 2 * ||W||^2``, constant ``lr``, zero init);
       validation accuracy recorded after each epoch count in ``epochs``.
    3. Choose the best validation accuracy (ties: fewer epochs, then larger weight decay).
    4. Train a fresh probe on the whole training set (mean/std from all of it) with the chosen
       setting, from a generator seeded afresh with ``seed`` (the final probe does not depend on the
       other settings of the grid); predict ``test_x`` and score against ``test_y`` -- both read only here.

    Rows are shuffled (seeded) once as they are copied into the one float32, standardised copy of
    ``train_x`` on ``device`` (default ``train_x.device``); minibatches are contiguous blocks of it,
    visited in a fresh seeded order each epoch.
    """
    _check_probe_inputs(train_x, train_y, test_x, test_y)
    _check_val_fraction(val_fraction)
    wds = [float(w) for w in weight_decays]
    eps = sorted({int(e) for e in epochs})
    if not wds or not eps:
        raise ConfigError("linear_probe needs at least one weight decay and one epoch count (empty grid)")
    _check_grid_values(wds, eps, lr)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    num_classes = _resolve_classes(train_y, num_classes)
    dev = torch.device(device) if device is not None else train_x.device

    y_cpu, tr, va = _train_val_rows(train_y, val_fraction, seed)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.empty(train_x.shape, dtype=torch.float32, device=dev)

    # selection: rows [shuffled train part | val part], statistics from the train part
    order = torch.cat([tr[torch.randperm(tr.shape[0], generator=gen)], va])
    _standardised_copy(train_x, order, tr.shape[0], x)
    y = y_cpu[order].to(dev)
    n_tr = tr.shape[0]
    x_val, y_val = x[n_tr:], y[n_tr:]
    grid: list[dict] = []

    def record(epoch: int, heads: _Heads) -> None:
        for wd, correct in zip(wds, heads.correct(x_val, y_val)):
            grid.append({"weight_decay": wd, "epochs": epoch, "val_acc": correct / va.shape[0]})

    _train_linear(x[:n_tr], y[:n_tr], num_classes=num_classes, weight_decays=wds, epochs=eps[-1], lr=lr,
                  batch_size=batch_size, gen=gen, checkpoints=eps, on_checkpoint=record, progress=progress,
                  desc="linear probe (selection)")
    best = min(grid, key=lambda g: (-g["val_acc"], g["epochs"], -g["weight_decay"]))
    chosen = {"weight_decay": best["weight_decay"], "epochs": best["epochs"], "lr": lr}

    # final: all rows reshuffled into the same buffer, statistics from all of them; a generator of its own,
    # so the final probe is the same whatever else the grid held
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(train_x.shape[0], generator=gen)
    mean, std = _standardised_copy(train_x, order, train_x.shape[0], x)
    y = y_cpu[order].to(dev)
    heads = _train_linear(x, y, num_classes=num_classes, weight_decays=[best["weight_decay"]],
                          epochs=best["epochs"], lr=lr, batch_size=batch_size, gen=gen, progress=progress,
                          desc="linear probe (final)")
    pred = torch.cat([heads.predict((test_x[s:s + _CHUNK].to(dev, torch.float32) - mean) / std)[:, 0]
                      for s in range(0, test_x.shape[0], _CHUNK)])
    return ProbeResult(test_acc=accuracy(pred, test_y), val_acc=best["val_acc"], chosen=chosen, grid=grid,
                       name="linear")


# --------------------------------------------------------------------------------------------------
# MLP probe


class _MLPs(nn.Module):
    """``S`` independent MLPs of one hidden width side by side, setting ``s`` being
    ``Linear(D, h, bias=False) -> BatchNorm1d(h) -> ReLU -> Dropout(dropouts[s]) -> Linear(h, C)``: one batched matrix
    product per layer serves them all, and a BatchNorm over the ``S * h`` stacked units is each model's own
    BatchNorm (its statistics are per unit).

    The first linear layer has no bias: the BatchNorm after it subtracts the batch mean, so such a bias changes
    nothing in training and its gradient is only rounding noise, which Adam would turn into steps of about
    ``lr`` (that noise depends on the order of the sums, so a model trained beside others would drift from the
    same model trained alone). Every model starts from the same weights, PyTorch's default for a linear layer
    (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weights and biases) drawn on the CPU from ``init_gen``, so the
    start is the same on every device and whatever the other settings are; each model's dropout masks come
    from its own generator, passed to :meth:`forward`.
    """

    def __init__(self, dim: int, hidden: int, num_classes: int, dropouts: Sequence[float],
                 init_gen: torch.Generator):
        super().__init__()

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:
            bound = 1.0 / math.sqrt(fan_in)
            one = torch.empty(*shape).uniform_(-bound, bound, generator=init_gen)
            return nn.Parameter(one.expand(len(dropouts), *shape).clone())

        self.w1 = uniform(hidden, dim, fan_in=dim)
        uniform(hidden, fan_in=dim)  # the bias it would have: drawn, unused, so the draws after it stay the same
        self.bn = nn.BatchNorm1d(len(dropouts) * hidden)
        self.w2, self.b2 = uniform(num_classes, hidden, fan_in=hidden), uniform(num_classes, fan_in=hidden)
        self.dropouts = list(dropouts)

    def forward(self, x: torch.Tensor, gens: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
        """``(S, B, C)`` logits of every model for the rows ``x`` ``(B, D)``."""
        s, b = len(self.dropouts), x.shape[0]
        h = torch.bmm(x.expand(s, *x.shape), self.w1.transpose(1, 2))  # (S, B, h)
        h = torch.relu(self.bn(h.transpose(0, 1).reshape(b, -1))).view(b, s, -1).transpose(0, 1)
        if self.training and any(p > 0 for p in self.dropouts):
            keep = torch.ones_like(h)
            for i, p in enumerate(self.dropouts):
                if p > 0:
                    draw = torch.rand(h.shape[1:], generator=gens[i], device=h.device) >= p
                    keep[i] = draw.to(h.dtype).div_(1.0 - p)
            h = h * keep
        return torch.baddbmm(self.b2[:, None, :], h, self.w2.transpose(1, 2))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                device: torch.device | None = None) -> torch.Tensor:
        """``(S, N)`` argmax class of every model for every row of ``x`` (standardised here with ``mean``/``std``
        when given); a single model's ``(N,)`` when ``S`` is 1."""
        was_training = self.training
        self.eval()
        dev = device if device is not None else x.device
        preds = []
        for start in range(0, x.shape[0], _CHUNK):
            c = x[start:start + _CHUNK].to(dev, torch.float32)
            if mean is not None:
                c = (c - mean) / std
            preds.append(self(c).argmax(-1))
        self.train(was_training)
        out = torch.cat(preds, dim=1)
        return out[0] if out.shape[0] == 1 else out


def _train_mlps(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, hidden: int,
                settings: Sequence[tuple[float, float]], epochs: int, lr: float, batch_size: int, seed: int,
                checkpoints: Sequence[int] = (), on_checkpoint=None, bar=None) -> _MLPs:
    """Train one :class:`_MLPs` model per ``(dropout, weight_decay)`` of ``settings`` on all rows of ``x`` for
    ``epochs`` epochs with ``torch.optim.Adam`` at a constant ``lr``; ``on_checkpoint(epoch, models)`` after each
    epoch in ``checkpoints``; ``bar.update(1)`` per step.

    Model ``s`` minimises ``mean CE + weight_decay_s / 2 * (||W1_s||^2 + ||W2_s||^2)`` (biases and BatchNorm not
    decayed: the decay is added to the weights' gradients, as Adam's ``weight_decay`` would), and the models
    share minibatches, so each one follows the run it would follow alone. Each epoch visits the rows in a fresh
    order; a last minibatch of a single row is skipped (BatchNorm needs two). Initial weights and row orders
    come from one CPU generator, each model's dropout masks from one on ``x.device``, all seeded with ``seed``:
    with a constant learning rate the models at epoch ``e`` are exactly those of an ``e``-epoch run.
    """
    gen = torch.Generator().manual_seed(int(seed))
    models = _MLPs(x.shape[1], hidden, num_classes, [p for p, _ in settings], gen).to(x.device)
    drop_gens = [torch.Generator(device=x.device).manual_seed(int(seed)) if p > 0 else None for p, _ in settings]
    decay = torch.tensor([wd for _, wd in settings], dtype=torch.float32, device=x.device)[:, None, None]
    opt = torch.optim.Adam(models.parameters(), lr=lr)
    n, count = x.shape[0], len(settings)
    models.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen).to(x.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if idx.shape[0] < 2:
                continue
            logits = models(x.index_select(0, idx), drop_gens)  # (S, B, C)
            targets = y.index_select(0, idx).repeat(count)
            loss = F.cross_entropy(logits.reshape(-1, num_classes), targets, reduction="sum") / idx.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                models.w1.grad.add_(decay * models.w1)
                models.w2.grad.add_(decay * models.w2)
            opt.step()
            if bar is not None:
                bar.update(1)
        if epoch in checkpoints and on_checkpoint is not None:
            on_checkpoint(epoch, models)
    models.eval()
    return models


def _train_mlp(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, hidden: int, dropout: float,
               weight_decay: float, epochs: int, lr: float, batch_size: int, seed: int, bar=None) -> _MLPs:
    """One MLP (:func:`_train_mlps` with the single setting ``(dropout, weight_decay)``)."""
    return _train_mlps(x, y, num_classes=num_classes, hidden=hidden, settings=[(dropout, weight_decay)],
                       epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, bar=bar)


def mlp_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
              num_classes: int | None = None, val_fraction: float = 0.1, hidden: int | Sequence[int] = (512,),
              dropouts: float | Sequence[float] = (0.0, 0.5), weight_decays: float | Sequence[float] = (0.0,),
              epochs: int | Sequence[int] = (5, 10), lr: float = 1e-3, batch_size: int = 1024, seed: int = 0,
              device: torch.device | str | None = None, progress: bool = False) -> ProbeResult:
    """Non-linear probe (as in FFCV-SSL): ``Linear(D, h) -> BatchNorm1d -> ReLU -> Dropout(p) -> Linear(h, C)``
    on standardised features ``z = (x - mean) / std``, trained with Adam.

    ``hidden`` (widths of the one hidden layer), ``dropouts``, ``weight_decays`` and ``epochs`` are each a
    value or a sequence of values; every combination is a setting.

    1. ``stratified_split(train_y, val_fraction, seed)``; mean/std from the train part only.
    2. One Adam run of ``max(epochs)`` epochs per (width, dropout, weight decay) -- the settings of one width
       trained side by side as one batched model on the same minibatches --, constant ``lr``,
       minibatches of ``batch_size`` (loss ``mean CE + wd / 2 * ||weights||^2``); validation accuracy
       recorded after each epoch count in ``epochs``. Every run starts from the same seeded state.
    3. Choose the best validation accuracy (ties: fewer epochs, then the narrower layer, then the larger
       weight decay, then the larger dropout).
    4. Train a fresh MLP on the whole training set (mean/std from all of it) with the chosen setting;
       predict ``test_x`` and score against ``test_y`` -- both read only here.

    Cost: ``len(hidden) * len(dropouts) * len(weight_decays) * max(epochs)`` epochs on the train part,
    then ``chosen["epochs"]`` on all rows. Work is in float32 on ``device`` (default ``train_x.device``),
    on one standardised copy of ``train_x``. Randomness comes from generators seeded with ``seed``; the
    global RNG is neither used nor changed.
    """
    _check_probe_inputs(train_x, train_y, test_x, test_y)
    _check_val_fraction(val_fraction)
    widths = list(dict.fromkeys(_as_list(hidden, "hidden")))
    try:
        widths = [operator.index(h) for h in widths]
    except TypeError:
        raise ConfigError(f"hidden widths must be integers, got {widths}") from None
    drops = [float(p) for p in dict.fromkeys(_as_list(dropouts, "dropouts"))]
    wds = [float(w) for w in dict.fromkeys(_as_list(weight_decays, "weight_decays"))]
    eps = sorted({int(e) for e in _as_list(epochs, "epochs")})
    if not widths or not drops or not wds or not eps:
        raise ConfigError("mlp_probe needs at least one hidden width, dropout, weight decay and epoch count "
                          "(empty grid)")
    if any(h < 1 for h in widths):
        raise ConfigError(f"hidden widths must be >= 1, got {widths}")
    if any(not 0.0 <= p < 1.0 for p in drops):
        raise ConfigError(f"dropouts must be in [0, 1), got {drops}")
    _check_grid_values(wds, eps, lr)
    if batch_size < 2:
        raise ConfigError(f"batch_size must be >= 2 (BatchNorm), got {batch_size}")
    num_classes = _resolve_classes(train_y, num_classes)
    dev = torch.device(device) if device is not None else train_x.device

    y_cpu, tr, va = _train_val_rows(train_y, val_fraction, seed)
    if tr.shape[0] < 2:
        raise ConfigError("mlp_probe needs at least 2 training rows outside the validation split")
    x = torch.empty(train_x.shape, dtype=torch.float32, device=dev)

    # selection: rows [train part | val part], statistics from the train part
    order = torch.cat([tr, va])
    _standardised_copy(train_x, order, tr.shape[0], x)
    y = y_cpu[order].to(dev)
    n_tr = tr.shape[0]
    x_val, y_val = x[n_tr:], y[n_tr:]
    per_width = [(p, wd) for p in drops for wd in wds]
    grid: list[dict] = []
    bar = None
    if progress:
        bar = make_bar(total=len(widths) * eps[-1] * math.ceil(n_tr / batch_size), desc="mlp probe (selection)",
                       unit="step")
    try:
        for h in widths:  # the settings of one width side by side (one batched model), widths one after the other
            def record(epoch: int, models: _MLPs, h=h) -> None:
                for (p, wd), pred in zip(per_width, models.predict(x_val).view(len(per_width), -1)):
                    grid.append({"hidden": h, "dropout": p, "weight_decay": wd, "epochs": epoch,
                                 "val_acc": accuracy(pred, y_val)})

            _train_mlps(x[:n_tr], y[:n_tr], num_classes=num_classes, hidden=h, settings=per_width,
                        epochs=eps[-1], lr=lr, batch_size=batch_size, seed=seed, checkpoints=eps,
                        on_checkpoint=record, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    # listed setting by setting (width, dropout, weight decay, then epochs), as the settings were given
    grid.sort(key=lambda g: (widths.index(g["hidden"]), drops.index(g["dropout"]), wds.index(g["weight_decay"]),
                             g["epochs"]))
    best = min(grid, key=lambda g: (-g["val_acc"], g["epochs"], g["hidden"], -g["weight_decay"], -g["dropout"]))
    chosen = {k: best[k] for k in ("hidden", "dropout", "weight_decay", "epochs")} | {"lr": lr}

    # final: all rows (in their original order; the training loop shuffles), statistics from all of them
    mean, std = _standardised_copy(train_x, torch.arange(train_x.shape[0]), train_x.shape[0], x)
    y = y_cpu.to(dev)
    if progress:
        bar = make_bar(total=best["epochs"] * math.ceil(x.shape[0] / batch_size), desc="mlp probe (final)",
                       unit="step")
    try:
        model = _train_mlp(x, y, num_classes=num_classes, hidden=best["hidden"], dropout=best["dropout"],
                           weight_decay=best["weight_decay"], epochs=best["epochs"], lr=lr, batch_size=batch_size,
                           seed=seed, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    del x
    pred = model.predict(test_x, mean, std, device=dev)
    return ProbeResult(test_acc=accuracy(pred, test_y), val_acc=best["val_acc"], chosen=chosen, grid=grid,
                       name="mlp")


# --------------------------------------------------------------------------------------------------
# weighted k-NN


def _l2_normalised(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy of ``x`` on ``device`` with unit-L2 rows (a zero row stays zero), chunk by chunk."""
    out = torch.empty(x.shape, dtype=torch.float32, device=device)
    for s in range(0, x.shape[0], _CHUNK):
        c = out[s:s + _CHUNK]
        c.copy_(x[s:s + _CHUNK])
        c.div_(c.norm(dim=1, keepdim=True).clamp_min_(1e-12))
    return out


def _check_knn_args(k: int, temperature: float, chunk: int) -> int:
    """``k`` as an ``int`` once it, ``temperature`` and ``chunk`` are checked."""
    try:
        k = operator.index(k)
    except TypeError:
        raise ConfigError(f"k must be an integer, got {k!r}") from None
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    return k


def _as_list(value, what: str) -> list:
    """``value`` as a list: a sequence (not a string) element by element, anything else as one element."""
    if isinstance(value, (str, bytes)):
        raise ConfigError(f"{what} must be a number or a sequence of numbers, got {value!r}")
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist()
    if isinstance(value, Sequence):
        return list(value)
    return [value]


def _shortlist_bank(bank: torch.Tensor, shortlist: str) -> torch.Tensor | None:
    """The unit-norm ``bank`` in bfloat16 when ``shortlist`` asks for a bfloat16 shortlist (``bf16``, or ``auto``
    on a CPU with native bfloat16), else None (float32 throughout)."""
    if shortlist not in ("auto", "bf16", "off"):
        raise ConfigError(f"shortlist must be auto, bf16 or off, got {shortlist!r}")
    # CUDA's float32 products are fast enough for k-NN that no shortlist is needed there
    wanted = shortlist == "bf16" or (shortlist == "auto" and bank.device.type == "cpu" and native_bf16(bank.device))
    return bank.to(torch.bfloat16) if wanted else None


def _top_neighbours(q: torch.Tensor, bank: torch.Tensor, bank_low: torch.Tensor | None, k: int,
                    exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(similarities, indices)`` of the ``k`` rows of ``bank`` most similar to each row of ``q`` (both unit-norm
    float32), sorted high to low; the bank rows ``exclude`` are never chosen.

    With ``bank_low`` (the bank in bfloat16) the candidates are shortlisted by a bfloat16 product -- the top
    ``k + 16`` -- and re-scored in float32, so the similarities returned are float32 dot products and the
    neighbours are float32's unless a true neighbour ranks below ``k + 16`` in bfloat16: 16 other rows would
    have to overtake it by bfloat16's rounding of a dot product (inputs rounded to 8 significant bits,
    products summed in float32: an error of about ``2**-9 * sqrt(sum_i (q_i b_i)**2)``, 1e-4 for dense
    unit vectors of a few hundred dimensions)."""
    if bank_low is None:
        sim = q @ bank.t()
        if exclude is not None:
            sim.index_fill_(1, exclude, -math.inf)
        return sim.topk(k, dim=1)  # sorted: the first k columns are the top k
    sim = q.to(torch.bfloat16) @ bank_low.t()
    if exclude is not None:
        sim.index_fill_(1, exclude, -math.inf)
    n_free = bank.shape[0] - (0 if exclude is None else exclude.shape[0])
    candidates = sim.topk(min(k + _SHORTLIST_MARGIN, n_free), dim=1).indices
    del sim
    exact = torch.empty(candidates.shape, dtype=torch.float32, device=q.device)
    for s in range(0, q.shape[0], 128):  # (128, m, D) gathered rows at a time
        rows = bank[candidates[s:s + 128]]
        exact[s:s + 128] = torch.einsum("bd,bmd->bm", q[s:s + 128], rows)
    top_sim, pos = exact.topk(k, dim=1)
    return top_sim, candidates.gather(1, pos)


def _knn_from_bank(bank: torch.Tensor, bank_y: torch.Tensor, query: torch.Tensor, query_rows: torch.Tensor | None,
                   *, pairs: Sequence[tuple[int, float]], num_classes: int, chunk: int,
                   exclude: torch.Tensor | None = None, bank_low: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted labels ``(len(pairs), n_query)``, row ``p`` for the ``(k, temperature) = pairs[p]``, for
    ``query`` (or the already normalised ``bank[query_rows]`` when ``query_rows`` is given) against the
    unit-norm ``bank``; the bank rows ``exclude`` are never neighbours; ``bank_low``: see :func:`_top_neighbours`.

    The top ``max(k)`` neighbours of each query chunk are found once; every pair reads its first ``k``.
    """
    n_bank = bank.shape[0] - (0 if exclude is None else exclude.shape[0])
    pairs = [(min(k, n_bank), t) for k, t in pairs]
    k_max = max(k for k, _ in pairs)
    n_query = query_rows.shape[0] if query_rows is not None else query.shape[0]
    preds = torch.empty(len(pairs), n_query, dtype=torch.int64, device=bank.device)
    for s in range(0, n_query, chunk):
        if query_rows is not None:
            q = bank.index_select(0, query_rows[s:s + chunk])
        else:
            q = query[s:s + chunk].to(bank.device, torch.float32)
            q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        top_sim, top_idx = _top_neighbours(q, bank, bank_low, k_max, exclude)
        top_y = bank_y[top_idx]
        shifted = top_sim - top_sim[:, :1]
        for p, (k, temperature) in enumerate(pairs):
            # exp(sim / T) up to a per-query factor exp(max / T), which leaves the argmax unchanged
            weight = (shifted[:, :k] / temperature).exp_()
            scores = torch.zeros(q.shape[0], num_classes, device=bank.device)
            scores.scatter_add_(1, top_y[:, :k], weight)
            preds[p, s:s + chunk] = scores.argmax(1)
    return preds


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024,
                shortlist: str = "auto") -> torch.Tensor:
    """Weighted k-NN labels for ``query_x`` (Wu et al. 2018): with ``s_i = cos(query, train_i)`` over the
    ``k`` most similar training points (``k`` clipped to ``len(train_x)``), predict
    ``argmax_c sum_{i in top-k, y_i = c} exp(s_i / T)`` (ties: the smaller class id).

    ``shortlist``: ``bf16`` finds candidate neighbours with a bfloat16 product and re-scores them in float32
    (:func:`_top_neighbours`), ``off`` uses float32 throughout, ``auto`` is ``bf16`` where bfloat16 products
    are native on a CPU (:func:`onepoch.precision.native_bf16`; on one measured by ``python benchmarks/eval.py``,
    2.4x faster with the same predictions).

    Computed in float32 on ``train_x.device``, ``chunk`` queries at a time (memory ``chunk * N``).
    """
    _check_features(train_x, "train_x")
    _check_labels(train_y, "train_y", train_x.shape[0])
    if not isinstance(query_x, torch.Tensor) or query_x.dim() != 2 or query_x.shape[1] != train_x.shape[1]:
        raise ConfigError(f"query_x must be a 2-D tensor with {train_x.shape[1]} features, got {_describe(query_x)}")
    k = _check_knn_args(k, temperature, chunk)
    num_classes = _resolve_classes(train_y, num_classes)
    bank = _l2_normalised(train_x, train_x.device)
    bank_low = _shortlist_bank(bank, shortlist)
    return _knn_from_bank(bank, train_y.to(bank.device, torch.int64), query_x, None, pairs=[(k, temperature)],
                          num_classes=num_classes, chunk=chunk, bank_low=bank_low)[0]


def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
              k: int | Sequence[int] = 20, temperature: float | Sequence[float] = 0.07, num_classes: int | None = None,
              val_fraction: float = 0.1, seed: int = 0, chunk: int = 1024, shortlist: str = "auto") -> ProbeResult:
    """Weighted k-NN probe, ``k`` and ``temperature`` each one value or a sequence of values to sweep.

    1. Every pair ``(k, T)`` of the product ``k x temperature`` is scored on the val part of
       ``stratified_split(train_y, val_fraction, seed)``: each val row is classified from the train part
       only (its own and the other val rows are never neighbours). The top ``max(k)`` neighbours of a
       query are found once and every pair is derived from them.
    2. The best val accuracy wins (ties: the smaller ``k``, then the larger ``temperature``).
    3. ``test_x`` is classified with that pair from the whole training set and scored against ``test_y``
       -- both read only here.

    ``chosen = {"k": k, "temperature": T}``; ``grid`` holds every pair (``k`` outer, ``temperature``
    inner, duplicates dropped) with its ``val_acc``. With one value each this is the plain probe.
    ``shortlist``: as for :func:`knn_predict`.
    """
    _check_probe_inputs(train_x, train_y, test_x, test_y)
    ks = list(dict.fromkeys(_check_knn_args(kk, 1.0, chunk) for kk in _as_list(k, "k")))
    temps = list(dict.fromkeys(_as_list(temperature, "temperature")))
    if not ks or not temps:
        raise ConfigError("knn_probe needs at least one k and one temperature (empty grid)")
    for t in temps:
        _check_knn_args(1, t, chunk)
    _check_val_fraction(val_fraction)
    num_classes = _resolve_classes(train_y, num_classes)
    bank = _l2_normalised(train_x, train_x.device)
    bank_low = _shortlist_bank(bank, shortlist)
    y = train_y.to(bank.device, torch.int64)
    _, va = stratified_split(y, val_fraction, seed)
    if va.shape[0] == 0:
        raise ConfigError("the validation split is empty: every class has a single training sample")
    pairs = [(kk, t) for kk in ks for t in temps]
    val_pred = _knn_from_bank(bank, y, bank, va, exclude=va, pairs=pairs, num_classes=num_classes, chunk=chunk,
                              bank_low=bank_low)
    y_val = y.index_select(0, va)
    grid = [{"k": kk, "temperature": t, "val_acc": accuracy(pred, y_val)} for (kk, t), pred in zip(pairs, val_pred)]
    best = min(grid, key=lambda g: (-g["val_acc"], g["k"], -g["temperature"]))
    chosen = {"k": best["k"], "temperature": best["temperature"]}
    test_pred = _knn_from_bank(bank, y, test_x, None, pairs=[(best["k"], best["temperature"])],
                               num_classes=num_classes, chunk=chunk, bank_low=bank_low)[0]
    return ProbeResult(test_acc=accuracy(test_pred, test_y), val_acc=best["val_acc"], chosen=chosen, grid=grid,
                       name="knn")
