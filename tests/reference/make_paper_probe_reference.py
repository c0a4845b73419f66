"""Write ``tests/reference/paper_probes.npz``: the official EMP-SSL evaluation's probes on fixed features, the
independent reference that ``tests/test_paper_protocol.py`` compares ``onepoch.paper_probes`` with.

Run it in the reference environment (torch 2.14.1, torchvision 0.29.1, lightly 1.6.0), from the repository root:

    /root/refvenv/bin/python tests/reference/make_paper_probe_reference.py

- Linear probe: the training loop of the official code's ``func.linear`` (EMP-SSL's ``evaluate.py`` calls it
  with lr 0.03) run as it stands there: ``torch.utils.data.DataLoader`` over the features (batch 100, shuffled,
  last partial batch dropped), ``nn.Linear`` with PyTorch's own initialisation, ``nn.CrossEntropyLoss``,
  ``torch.optim.SGD(lr=0.03, momentum=0.9, weight_decay=5e-5)``, ``CosineAnnealingLR(T_max=100)`` stepped
  after each epoch, 100 epochs; after each epoch the test accuracy is the mean of the accuracies of test
  batches of 100 (300 test rows: 3 whole batches). The shuffled orders the DataLoader drew and the initial
  weights are recorded so that the test can replay the same run.
- k-NN: lightly's ``knn_predict`` (the weighted k-NN of Wu et al. that the official ``WeightedKNNClassifier``
  also computes: cosine similarity, top k, weights ``exp(s / T)``) with the official defaults k = 20,
  T = 0.07, every training row a candidate.

This script does not import onepoch.
"""

from __future__ import annotations

from pathlib import Path

import lightly
import numpy as np
import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

OUT = Path(__file__).with_name("paper_probes.npz")
N_TRAIN, N_TEST, DIM, CLASSES, EPOCHS = 600, 300, 24, 5, 100


def features(rng: np.random.Generator):
    """Overlapping Gaussian classes, so that accuracy is far from 0 and from 1 and changes over the epochs."""
    centres = rng.normal(0, 1.0, (CLASSES, DIM))

    def split(n):
        y = rng.integers(0, CLASSES, n)
        return (centres[y] + rng.normal(0, 2.0, (n, DIM))).astype(np.float32), y.astype(np.int64)

    return split(N_TRAIN), split(N_TEST)


def official_linear(xtr, ytr, xte, yte):
    torch.manual_seed(0)
    # the row index travels with each row, so that the order the loader drew is recorded as it is used
    loader = DataLoader(TensorDataset(xtr, ytr, torch.arange(N_TRAIN)), batch_size=100, shuffle=True, drop_last=True)
    test_loader = DataLoader(TensorDataset(xte, yte), batch_size=100, shuffle=False, drop_last=False)
    head = nn.Linear(DIM, CLASSES)
    init_w, init_b = head.weight.detach().clone(), head.bias.detach().clone()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 100)
    criterion = nn.CrossEntropyLoss()
    orders, test_acc = [], []
    for _ in range(EPOCHS):
        used = []
        for x, y, rows in loader:
            used.append(rows)
            loss = criterion(head(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        used = torch.cat(used)  # 600 rows in 6 whole batches: every row once
        order = torch.cat([used, torch.tensor(sorted(set(range(N_TRAIN)) - set(used.tolist())), dtype=torch.int64)])
        with torch.no_grad():
            accs = [(head(x).argmax(1) == y).float().mean().item() for x, y in test_loader]
        test_acc.append(float(np.mean(accs)))
        orders.append(order.numpy())
    return init_w.numpy(), init_b.numpy(), np.stack(orders), np.asarray(test_acc), head.weight.detach().numpy()


def main() -> None:
    rng = np.random.default_rng(2023)
    (xtr, ytr), (xte, yte) = features(rng)
    txtr, tytr, txte, tyte = map(torch.from_numpy, (xtr, ytr, xte, yte))
    init_w, init_b, orders, test_acc, final_w = official_linear(txtr, tytr, txte, tyte)
    bank = F.normalize(txtr, dim=1).t().contiguous()  # lightly's feature bank: (D, N), unit columns
    ranked = knn_predict(F.normalize(txte, dim=1), bank, tytr, CLASSES, knn_k=20, knn_t=0.07)
    knn_acc = float((ranked[:, 0] == tyte).float().mean())
    np.savez_compressed(OUT, train_x=xtr, train_y=ytr, test_x=xte, test_y=yte, init_weight=init_w,
                        init_bias=init_b, orders=orders.astype(np.int16), test_acc=test_acc, final_weight=final_w,
                        knn_acc=np.float64(knn_acc),
                        versions=np.array(f"torch {torch.__version__}, lightly {lightly.__version__}"))
    print(f"wrote {OUT}: linear last {test_acc[-1]:.4f}, best {test_acc.max():.4f}; k-NN {knn_acc:.4f}")


if __name__ == "__main__":
    main()
