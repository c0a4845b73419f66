"""Evaluation probes on frozen features already in memory: a linear probe and a weighted k-NN.

Both take ``(train_x, train_y, test_x, test_y)``: ``x`` is ``(N, D)`` floating (float16, bfloat16 or
float32; work is done in float32, batch by batch), ``y`` is ``(N,)`` integer class ids in
``[0, num_classes)``. Hyper-parameters are chosen on a stratified validation split of the training
set; the test set is touched once, at the very end (``test_x`` and ``test_y`` are read only there).

* :func:`linear_probe`: softmax regression on standardised features, trained with a seeded Adam;
  weight decay and epoch count chosen on validation, then retrained on the whole training set.
* :func:`knn_probe` / :func:`knn_predict`: the weighted k-NN classifier of Wu et al. 2018
  (InstDisc): cosine similarity, top-k neighbours, weights ``exp(sim / T)``.

Everything random comes from explicit ``torch.Generator`` objects seeded with ``seed``; the global
RNG is never used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from onepoch.errors import ConfigError

__all__ = [
    "ProbeResult",
    "accuracy",
    "knn_predict",
    "knn_probe",
    "linear_probe",
    "stratified_split",
]

_CHUNK = 4096  # rows per chunk when converting / standardising / evaluating whole feature matrices
_STD_FLOOR = 1e-6  # a feature whose std is below this is only centred (divided by 1)


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


@dataclass
class _Heads:
    """``H`` independent softmax-regression heads stacked into one ``(H*C, D)`` layer, with Adam state.

    Head ``h`` minimises ``mean CE + weight_decay[h] / 2 * ||W_h||^2`` (the bias is not decayed);
    the heads share minibatches, so one matrix product serves them all.
    """

    weight: torch.Tensor  # (H*C, D)
    bias: torch.Tensor  # (H*C,)
    decay: torch.Tensor  # (H*C, 1): each row's weight decay
    num_classes: int
    lr: float
    state: list[torch.Tensor]  # Adam moments: m_w, v_w, m_b, v_b
    step: int = 0

    @classmethod
    def zeros(cls, dim: int, num_classes: int, weight_decays: Sequence[float], lr: float,
              device: torch.device) -> _Heads:
        rows = len(weight_decays) * num_classes
        w = torch.zeros(rows, dim, device=device)
        b = torch.zeros(rows, device=device)
        decay = torch.tensor(weight_decays, dtype=torch.float32, device=device).repeat_interleave(num_classes)
        state = [torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(b), torch.zeros_like(b)]
        return cls(w, b, decay[:, None], num_classes, lr, state)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H)`` argmax class of every head for the rows ``x`` ``(B, D)``."""
        logits = torch.addmm(self.bias, x, self.weight.t())
        return logits.view(x.shape[0], -1, self.num_classes).argmax(-1)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One Adam step on the minibatch; gradient of softmax CE by hand: ``dL/dz = (p - onehot) / B``."""
        b = x.shape[0]
        logits = torch.addmm(self.bias, x, self.weight.t()).view(b, -1, self.num_classes)
        g = torch.softmax(logits, dim=-1)
        g[torch.arange(b, device=x.device), :, y] -= 1.0
        g = g.view(b, -1).div_(b)
        grad_w = torch.addmm(self.weight * self.decay, g.t(), x)
        grad_b = g.sum(0)
        self.step += 1
        _adam(self.weight, grad_w, self.state[0], self.state[1], self.step, self.lr)
        _adam(self.bias, grad_b, self.state[2], self.state[3], self.step, self.lr)

    def correct(self, x: torch.Tensor, y: torch.Tensor) -> list[int]:
        """Number of rows of ``x`` each head classifies as ``y``."""
        correct = torch.zeros(self.decay.shape[0] // self.num_classes, dtype=torch.int64, device=x.device)
        for s in range(0, x.shape[0], _CHUNK):
            correct += (self.predict(x[s:s + _CHUNK]) == y[s:s + _CHUNK, None]).sum(0)
        return [int(c) for c in correct]


def _adam(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """Adam (Kingma & Ba) in place: ``p -= lr * m_hat / (sqrt(v_hat) + eps)``."""
    b1, b2 = betas
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (v / (1 - b2 ** step)).sqrt_().add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - b1 ** step))


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
    heads = _Heads.zeros(x.shape[1], num_classes, weight_decays, lr, x.device)
    n_batches = math.ceil(x.shape[0] / batch_size)
    bar = None
    if progress:
        from onepoch.progress import progress as make_bar
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
       setting; predict ``test_x`` and score against ``test_y`` -- both read only here.

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
    if any(not math.isfinite(w) or w < 0 for w in wds):
        raise ConfigError(f"weight decays must be finite and >= 0, got {list(weight_decays)}")
    if eps[0] < 1:
        raise ConfigError(f"epoch counts must be >= 1, got {list(epochs)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be > 0, got {lr}")
    num_classes = _resolve_classes(train_y, num_classes)
    dev = torch.device(device) if device is not None else train_x.device

    y_cpu = train_y.detach().to("cpu", torch.int64)
    tr, va = stratified_split(y_cpu, val_fraction, seed)
    if va.shape[0] == 0:
        raise ConfigError("the validation split is empty: every class has a single training sample")
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

    # final: all rows reshuffled into the same buffer, statistics from all of them
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
# weighted k-NN


def _l2_normalised(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy of ``x`` on ``device`` with unit-L2 rows (a zero row stays zero), chunk by chunk."""
    out = torch.empty(x.shape, dtype=torch.float32, device=device)
    for s in range(0, x.shape[0], _CHUNK):
        c = out[s:s + _CHUNK]
        c.copy_(x[s:s + _CHUNK])
        c.div_(c.norm(dim=1, keepdim=True).clamp_min_(1e-12))
    return out


def _check_knn_args(k: int, temperature: float, chunk: int) -> None:
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")


def _knn_from_bank(bank: torch.Tensor, bank_y: torch.Tensor, query: torch.Tensor, query_rows: torch.Tensor | None,
                   *, k: int, temperature: float, num_classes: int, chunk: int,
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted labels for ``query`` (or the already normalised ``bank[query_rows]`` when ``query_rows``
    is given) against the unit-norm ``bank``; the bank rows ``exclude`` are never neighbours."""
    n_bank = bank.shape[0] - (0 if exclude is None else exclude.shape[0])
    k = min(k, n_bank)
    n_query = query_rows.shape[0] if query_rows is not None else query.shape[0]
    preds = []
    for s in range(0, n_query, chunk):
        if query_rows is not None:
            q = bank.index_select(0, query_rows[s:s + chunk])
        else:
            q = query[s:s + chunk].to(bank.device, torch.float32)
            q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = q @ bank.t()
        if exclude is not None:
            sim.index_fill_(1, exclude, -math.inf)
        top_sim, top_idx = sim.topk(k, dim=1)
        # exp(sim / T) up to a per-query factor exp(max / T), which leaves the argmax unchanged
        weight = ((top_sim - top_sim[:, :1]) / temperature).exp_()
        scores = torch.zeros(q.shape[0], num_classes, device=bank.device)
        scores.scatter_add_(1, bank_y[top_idx], weight)
        preds.append(scores.argmax(1))
    if not preds:
        return torch.empty(0, dtype=torch.int64, device=bank.device)
    return torch.cat(preds)


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN labels for ``query_x`` (Wu et al. 2018): with ``s_i = cos(query, train_i)`` over the
    ``k`` most similar training points (``k`` clipped to ``len(train_x)``), predict
    ``argmax_c sum_{i in top-k, y_i = c} exp(s_i / T)`` (ties: the smaller class id).

    Computed in float32 on ``train_x.device``, ``chunk`` queries at a time (memory ``chunk * N``).
    """
    _check_features(train_x, "train_x")
    _check_labels(train_y, "train_y", train_x.shape[0])
    if not isinstance(query_x, torch.Tensor) or query_x.dim() != 2 or query_x.shape[1] != train_x.shape[1]:
        raise ConfigError(f"query_x must be a 2-D tensor with {train_x.shape[1]} features, got {_describe(query_x)}")
    _check_knn_args(k, temperature, chunk)
    num_classes = _resolve_classes(train_y, num_classes)
    bank = _l2_normalised(train_x, train_x.device)
    return _knn_from_bank(bank, train_y.to(bank.device, torch.int64), query_x, None, k=k,
                          temperature=temperature, num_classes=num_classes, chunk=chunk)


def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
              k: int = 20, temperature: float = 0.07, num_classes: int | None = None, val_fraction: float = 0.1,
              seed: int = 0, chunk: int = 1024) -> ProbeResult:
    """Weighted k-NN probe (no selection): ``val_acc`` is the accuracy on ``stratified_split(train_y,
    val_fraction, seed)``'s val part predicted from its train part; ``test_acc`` predicts ``test_x``
    from the whole training set. ``chosen = {"k": k, "temperature": temperature}``.
    """
    _check_probe_inputs(train_x, train_y, test_x, test_y)
    _check_knn_args(k, temperature, chunk)
    _check_val_fraction(val_fraction)
    num_classes = _resolve_classes(train_y, num_classes)
    bank = _l2_normalised(train_x, train_x.device)
    y = train_y.to(bank.device, torch.int64)
    _, va = stratified_split(y, val_fraction, seed)
    if va.shape[0] == 0:
        raise ConfigError("the validation split is empty: every class has a single training sample")
    args = {"k": k, "temperature": temperature, "num_classes": num_classes, "chunk": chunk}
    val_acc = accuracy(_knn_from_bank(bank, y, bank, va, exclude=va, **args), y.index_select(0, va))
    test_acc = accuracy(_knn_from_bank(bank, y, test_x, None, **args), test_y)
    chosen = {"k": k, "temperature": temperature}
    return ProbeResult(test_acc=test_acc, val_acc=val_acc, chosen=chosen, grid=[{**chosen, "val_acc": val_acc}],
                       name="knn")
