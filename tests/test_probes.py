"""Probes on in-memory features: stratified split, linear probe, MLP probe, weighted k-NN (and its sweep)."""

from __future__ import annotations

import math

import pytest
import torch

from onepoch import probes
from onepoch.errors import ConfigError
from onepoch.probes import (
    ProbeResult,
    accuracy,
    knn_predict,
    knn_probe,
    linear_probe,
    mlp_probe,
    stratified_split,
)

FAST = {"epochs": (2, 4), "weight_decays": (0.0, 1e-3), "batch_size": 64}
MLP_FAST = {"hidden": (32,), "dropouts": (0.0, 0.5), "weight_decays": (0.0,), "epochs": (3, 6), "batch_size": 64}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (on a busy machine, idle OpenMP threads make each op ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(n_train: int = 400, n_test: int = 200, classes: int = 4, dim: int = 12, spread: float = 6.0,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian blobs (unit noise) around random centres ``spread`` apart: linearly separable in practice."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * spread
    ytr = torch.randint(0, classes, (n_train,), generator=g)
    yte = torch.randint(0, classes, (n_test,), generator=g)
    xtr = centres[ytr] + torch.randn(n_train, dim, generator=g)
    xte = centres[yte] + torch.randn(n_test, dim, generator=g)
    return xtr, ytr, xte, yte


# --------------------------------------------------------------------------------------------------
# stratified_split


def split_labels() -> torch.Tensor:
    counts = [50, 30, 7, 2, 1]
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return labels[torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(3))]


def test_split_sizes_disjoint_cover_sorted():
    labels = split_labels()
    tr, va = stratified_split(labels, 0.2, seed=0)
    assert tr.dtype == va.dtype == torch.int64
    assert torch.equal(torch.sort(torch.cat([tr, va])).values, torch.arange(labels.shape[0]))
    assert torch.equal(tr, torch.sort(tr).values) and torch.equal(va, torch.sort(va).values)
    # round(0.2 * n_c) clipped to [1, n_c - 1]; the singleton class stays in training
    assert torch.bincount(labels[va], minlength=5).tolist() == [10, 6, 1, 1, 0]
    assert torch.bincount(labels[tr], minlength=5).tolist() == [40, 24, 6, 1, 1]


def test_split_deterministic_and_seeded():
    labels = split_labels()
    a, b, c = (stratified_split(labels, 0.3, seed=s) for s in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(torch.bincount(labels[a[1]]), torch.bincount(labels[c[1]]))  # same per-class sizes


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_bad_fraction(fraction):
    with pytest.raises(ConfigError, match=r"val_fraction must be in \(0, 1\)"):
        stratified_split(torch.zeros(10, dtype=torch.int64), fraction, seed=0)


def test_split_bad_labels():
    with pytest.raises(ConfigError, match="integer"):
        stratified_split(torch.zeros(10), 0.1, seed=0)
    with pytest.raises(ConfigError, match="1-D"):
        stratified_split(torch.zeros(2, 5, dtype=torch.int64), 0.1, seed=0)


# --------------------------------------------------------------------------------------------------
# linear probe


def test_linear_probe_separable_blobs():
    xtr, ytr, xte, yte = blobs()
    r = linear_probe(xtr, ytr, xte, yte, **FAST)
    assert isinstance(r, ProbeResult) and r.name == "linear"
    assert r.test_acc == 1.0 and r.val_acc == 1.0
    assert len(r.grid) == 4 and {(g["weight_decay"], g["epochs"]) for g in r.grid} == {
        (0.0, 2), (1e-3, 2), (0.0, 4), (1e-3, 4)}
    # every setting is perfect: ties go to fewer epochs, then the larger weight decay
    assert all(g["val_acc"] == 1.0 for g in r.grid)
    assert r.chosen["weight_decay"] == 1e-3 and r.chosen["epochs"] == 2


def test_linear_probe_half_precision_features():
    xtr, ytr, xte, yte = blobs()
    for dtype in (torch.float16, torch.bfloat16):
        r = linear_probe(xtr.to(dtype), ytr, xte.to(dtype), yte, **FAST)
        assert r.test_acc == 1.0


def test_linear_probe_noise_labels_at_chance():
    g = torch.Generator().manual_seed(1)
    xtr, xte = torch.randn(600, 8, generator=g), torch.randn(2000, 8, generator=g)
    ytr, yte = torch.randint(0, 4, (600,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    r = linear_probe(xtr, ytr, xte, yte, **FAST)
    assert abs(r.test_acc - 0.25) < 0.05  # sd of the accuracy is 0.01
    assert r.val_acc < 0.6


def test_linear_probe_deterministic():
    xtr, ytr, xte, yte = blobs(spread=0.7)  # overlapping: accuracies are not all 1
    a = linear_probe(xtr, ytr, xte, yte, seed=5, **FAST)
    b = linear_probe(xtr, ytr, xte, yte, seed=5, **FAST)
    assert a == b
    assert 0.4 < a.test_acc < 1.0


def test_linear_probe_epoch_grid_is_checkpoints_of_one_run():
    xtr, ytr, xte, yte = blobs(spread=0.7)
    many = linear_probe(xtr, ytr, xte, yte, epochs=(1, 3, 5), weight_decays=(0.0, 1e-3), batch_size=64)
    one = linear_probe(xtr, ytr, xte, yte, epochs=(3,), weight_decays=(1e-3,), batch_size=64)
    at3 = next(g for g in many.grid if g["epochs"] == 3 and g["weight_decay"] == 1e-3)
    n_val = 40  # 10% of 400
    assert abs(at3["val_acc"] - one.val_acc) <= 1 / n_val  # float rounding may move one borderline point
    assert len({g["val_acc"] for g in many.grid}) > 1


def test_linear_probe_selection_ignores_test_labels():
    xtr, ytr, xte, yte = blobs()
    base = linear_probe(xtr, ytr, xte, yte, **FAST)
    perm = torch.randperm(yte.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = linear_probe(xtr, ytr, xte, yte[perm], **FAST)
    wrong = linear_probe(xtr, ytr, xte, (yte + 1) % 4, **FAST)
    for r in (shuffled, wrong):
        assert (r.chosen, r.val_acc, r.grid) == (base.chosen, base.val_acc, base.grid)
    assert base.test_acc == 1.0 and wrong.test_acc == 0.0 and shuffled.test_acc < 0.5


_METADATA = {"__get__", "__len__", "dim", "size", "is_floating_point", "is_complex"}


def spy(t: torch.Tensor, tag: str, log: list) -> torch.Tensor:
    """``t`` as a tensor that logs ``(tag, op)`` for every op reading more than its shape/dtype/device."""

    class Spy(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", repr(func))
            if name not in _METADATA:
                log.append((tag, name))
            return super().__torch_function__(func, types, args, kwargs)

    return t.as_subclass(Spy)


def test_linear_probe_reads_test_data_only_after_training(monkeypatch):
    log: list = []
    original = probes._train_linear

    def logged(*args, **kwargs):
        log.append(("train", kwargs.get("desc")))
        return original(*args, **kwargs)

    monkeypatch.setattr(probes, "_train_linear", logged)
    xtr, ytr, xte, yte = blobs()
    r = linear_probe(xtr, ytr, spy(xte, "test_x", log), spy(yte, "test_y", log), **FAST)
    assert r.test_acc == 1.0
    trains = [i for i, (tag, _) in enumerate(log) if tag == "train"]
    reads = [i for i, (tag, _) in enumerate(log) if tag in ("test_x", "test_y")]
    assert len(trains) == 2  # selection, then the final probe
    assert any(log[i][0] == "test_y" for i in reads) and any(log[i][0] == "test_x" for i in reads)
    assert min(reads) > max(trains), log


def test_linear_probe_errors():
    xtr, ytr, xte, yte = blobs(n_train=40, n_test=10)
    cases = [
        ({"weight_decays": ()}, "empty grid"),
        ({"epochs": ()}, "empty grid"),
        ({"epochs": (0, 5)}, "epoch counts must be >= 1"),
        ({"weight_decays": (-1.0,)}, "weight decays must be finite and >= 0"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"),
        ({"num_classes": 2}, "train_y has class id 3 but num_classes is 2"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            linear_probe(xtr, ytr, xte, yte, **kwargs)
    with pytest.raises(ConfigError, match="train_y has 39 labels but the features have 40 rows"):
        linear_probe(xtr, ytr[:-1], xte, yte)
    with pytest.raises(ConfigError, match="test_x has 5 features but train_x has 12"):
        linear_probe(xtr, ytr, xte[:, :5], yte)
    with pytest.raises(ConfigError, match="train_x must be floating point"):
        linear_probe(xtr.long(), ytr, xte, yte)
    with pytest.raises(ConfigError, match="validation split is empty"):
        linear_probe(xtr[:3], torch.tensor([0, 1, 2]), xte, yte)


# --------------------------------------------------------------------------------------------------
# MLP probe


def xor_points(n: int, seed: int, noise_dims: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian points, label = whether ``x0`` and ``x1`` have different signs (quadrant parity), plus
    ``noise_dims`` irrelevant dimensions: no linear classifier does better than chance."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2 + noise_dims, generator=g)
    return x, ((x[:, 0] > 0) != (x[:, 1] > 0)).long()


def test_mlp_probe_separable_blobs():
    xtr, ytr, xte, yte = blobs()
    r = mlp_probe(xtr, ytr, xte, yte, **MLP_FAST)
    assert isinstance(r, ProbeResult) and r.name == "mlp"
    assert r.test_acc >= 0.98 and r.val_acc >= 0.98
    assert len(r.grid) == 4 and {(g["hidden"], g["dropout"], g["weight_decay"], g["epochs"]) for g in r.grid} == {
        (32, 0.0, 0.0, 3), (32, 0.5, 0.0, 3), (32, 0.0, 0.0, 6), (32, 0.5, 0.0, 6)}
    assert set(r.chosen) == {"hidden", "dropout", "weight_decay", "epochs", "lr"} and r.chosen["lr"] == 1e-3
    best = max(g["val_acc"] for g in r.grid)
    assert r.val_acc == best
    assert any(all(g[k] == r.chosen[k] for k in ("hidden", "dropout", "weight_decay", "epochs"))
               and g["val_acc"] == best for g in r.grid)
    half = mlp_probe(xtr.half(), ytr, xte.bfloat16(), yte, **MLP_FAST)
    assert half.test_acc >= 0.98


def test_mlp_probe_noise_labels_at_chance():
    g = torch.Generator().manual_seed(1)
    xtr, xte = torch.randn(600, 8, generator=g), torch.randn(2000, 8, generator=g)
    ytr, yte = torch.randint(0, 4, (600,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    r = mlp_probe(xtr, ytr, xte, yte, **MLP_FAST)
    assert abs(r.test_acc - 0.25) < 0.05  # sd of the accuracy is 0.01
    assert r.val_acc < 0.6


def test_mlp_probe_beats_linear_on_xor():
    xtr, ytr = xor_points(800, seed=0)
    xte, yte = xor_points(1000, seed=1)
    linear = linear_probe(xtr, ytr, xte, yte, **FAST)
    mlp = mlp_probe(xtr, ytr, xte, yte, hidden=(32,), dropouts=(0.0,), epochs=(10,), lr=1e-2, batch_size=64)
    assert 0.4 < linear.test_acc < 0.62
    assert mlp.test_acc > 0.9 and mlp.val_acc > 0.85


def test_mlp_probe_deterministic_and_leaves_global_rng_alone():
    xtr, ytr, xte, yte = blobs(spread=0.7)  # overlapping: accuracies are not all 1
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = mlp_probe(xtr, ytr, xte, yte, seed=5, **MLP_FAST)
    assert torch.equal(torch.get_rng_state(), state)
    b = mlp_probe(xtr, ytr, xte, yte, seed=5, **MLP_FAST)
    assert a == b
    assert 0.4 < a.test_acc < 1.0
    c = mlp_probe(xtr, ytr, xte, yte, seed=6, **MLP_FAST)
    assert [g["val_acc"] for g in c.grid] != [g["val_acc"] for g in a.grid]


def test_mlp_probe_chooses_best_val_setting_and_retrains_with_it():
    xtr, ytr, xte, yte = blobs(spread=0.7)
    grid = {"hidden": (8, 32), "dropouts": (0.0, 0.5), "weight_decays": (0.0, 1e-2), "epochs": (1, 4)}
    r = mlp_probe(xtr, ytr, xte, yte, batch_size=64, **grid)
    assert len(r.grid) == 16 and len({g["val_acc"] for g in r.grid}) > 2
    # measured (40 validation rows): the best, 18 correct, is one setting; four settings tie at 16 below it
    assert sorted(round(g["val_acc"] * 40) for g in r.grid)[-3:] == [16, 17, 18]
    assert r.chosen == {"hidden": 32, "dropout": 0.0, "weight_decay": 0.0, "epochs": 4, "lr": 1e-3}
    best = next(g for g in r.grid if all(g[k] == r.chosen[k] for k in ("hidden", "dropout", "weight_decay", "epochs")))
    assert r.val_acc == best["val_acc"] == max(g["val_acc"] for g in r.grid)
    # every setting is trained from the same seeded start, whatever else the grid holds
    only = mlp_probe(xtr, ytr, xte, yte, batch_size=64, hidden=best["hidden"], dropouts=best["dropout"],
                     weight_decays=best["weight_decay"], epochs=best["epochs"])
    assert only.grid == [best]
    # the final probe is the chosen setting retrained on all of train, standardised with its statistics
    mean, std = xtr.double().mean(0), xtr.double().std(0, unbiased=False)
    z = ((xtr - mean.float()) / std.float())
    final = probes._train_mlp(z, ytr, num_classes=4, hidden=best["hidden"], dropout=best["dropout"],
                              weight_decay=best["weight_decay"], epochs=best["epochs"], lr=1e-3, batch_size=64, seed=0)
    assert r.test_acc == accuracy(final.predict(xte, mean.float(), std.float()), yte)
    assert 0.4 < r.test_acc < 1.0


def test_mlp_settings_trained_side_by_side_are_each_the_run_alone():
    """The batched models of one width: each setting's validation accuracies equal those of the setting
    trained alone (the same start, minibatches and dropout masks), and its weights too."""
    xtr, ytr, xte, yte = blobs(spread=0.7)
    grid = {"hidden": (16,), "dropouts": (0.0, 0.3, 0.6), "weight_decays": (0.0, 1e-2), "epochs": (1, 3),
            "batch_size": 64}
    together = mlp_probe(xtr, ytr, xte, yte, **grid)
    alone = []
    for p in grid["dropouts"]:
        for wd in grid["weight_decays"]:
            alone += mlp_probe(xtr, ytr, xte, yte, **{**grid, "dropouts": p, "weight_decays": wd}).grid
    assert together.grid == alone
    assert len({g["val_acc"] for g in alone}) > 2
    z = (xtr - xtr.mean(0)) / xtr.std(0)
    settings = [(0.0, 0.0), (0.6, 1e-2)]
    both = probes._train_mlps(z, ytr, num_classes=4, hidden=16, settings=settings, epochs=2, lr=1e-3,
                              batch_size=64, seed=0)
    for s, (p, wd) in enumerate(settings):
        one = probes._train_mlp(z, ytr, num_classes=4, hidden=16, dropout=p, weight_decay=wd, epochs=2, lr=1e-3,
                                batch_size=64, seed=0)
        for name in ("w1", "w2", "b2"):
            torch.testing.assert_close(getattr(both, name)[s], getattr(one, name)[0], rtol=1e-5, atol=1e-6)
        for stat in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(both.bn, stat).view(2, -1)[s], getattr(one.bn, stat), rtol=1e-5,
                                       atol=1e-6)


def test_mlp_probe_epoch_grid_is_checkpoints_of_one_run():
    xtr, ytr, xte, yte = blobs(spread=0.7)
    many = mlp_probe(xtr, ytr, xte, yte, hidden=(16,), dropouts=(0.5,), epochs=(1, 3, 5), batch_size=64)
    one = mlp_probe(xtr, ytr, xte, yte, hidden=(16,), dropouts=(0.5,), epochs=(3,), batch_size=64)
    assert next(g for g in many.grid if g["epochs"] == 3)["val_acc"] == one.val_acc  # same run, stopped early
    assert len({g["val_acc"] for g in many.grid}) > 1


def test_mlp_probe_selection_ignores_test_labels():
    xtr, ytr, xte, yte = blobs()
    base = mlp_probe(xtr, ytr, xte, yte, **MLP_FAST)
    perm = torch.randperm(yte.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = mlp_probe(xtr, ytr, xte, yte[perm], **MLP_FAST)
    wrong = mlp_probe(xtr, ytr, xte, (yte + 1) % 4, **MLP_FAST)
    for r in (shuffled, wrong):
        assert (r.chosen, r.val_acc, r.grid) == (base.chosen, base.val_acc, base.grid)
    assert base.test_acc >= 0.98 and wrong.test_acc <= 0.02 and shuffled.test_acc < 0.5


def test_mlp_probe_reads_test_data_only_after_training(monkeypatch):
    log: list = []
    original = probes._train_mlps

    def logged(*args, **kwargs):
        log.append(("train", [dropout for dropout, _ in kwargs["settings"]]))
        return original(*args, **kwargs)

    monkeypatch.setattr(probes, "_train_mlps", logged)
    xtr, ytr, xte, yte = blobs()
    r = mlp_probe(xtr, ytr, spy(xte, "test_x", log), spy(yte, "test_y", log), **MLP_FAST)
    assert r.test_acc >= 0.98
    trains = [i for i, (tag, _) in enumerate(log) if tag == "train"]
    reads = [i for i, (tag, _) in enumerate(log) if tag in ("test_x", "test_y")]
    # the two settings (dropout 0 and 0.5) side by side, then the final probe
    assert [log[i][1] for i in trains] == [[0.0, 0.5], [r.chosen["dropout"]]]
    assert any(log[i][0] == "test_y" for i in reads) and any(log[i][0] == "test_x" for i in reads)
    assert min(reads) > max(trains), log


def test_mlp_probe_errors():
    xtr, ytr, xte, yte = blobs(n_train=40, n_test=10)
    cases = [
        ({"hidden": ()}, "empty grid"),
        ({"dropouts": ()}, "empty grid"),
        ({"weight_decays": ()}, "empty grid"),
        ({"epochs": ()}, "empty grid"),
        ({"hidden": (0,)}, "hidden widths must be >= 1"),
        ({"hidden": (2.5,)}, "hidden widths must be integers"),
        ({"dropouts": (0.0, 1.0)}, r"dropouts must be in \[0, 1\)"),
        ({"epochs": (0, 5)}, "epoch counts must be >= 1"),
        ({"weight_decays": (-1.0,)}, "weight decays must be finite and >= 0"),
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\)"),
        ({"num_classes": 2}, "train_y has class id 3 but num_classes is 2"),
        ({"batch_size": 1}, "batch_size must be >= 2"),
        ({"lr": -1.0}, "lr must be > 0"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            mlp_probe(xtr, ytr, xte, yte, **kwargs)
    with pytest.raises(ConfigError, match="train_y has 39 labels but the features have 40 rows"):
        mlp_probe(xtr, ytr[:-1], xte, yte)
    with pytest.raises(ConfigError, match="test_x has 5 features but train_x has 12"):
        mlp_probe(xtr, ytr, xte[:, :5], yte)
    with pytest.raises(ConfigError, match="test_y must be an integer tensor"):
        mlp_probe(xtr, ytr, xte, yte.float())
    with pytest.raises(ConfigError, match="validation split is empty"):
        mlp_probe(xtr[:3], torch.tensor([0, 1, 2]), xte, yte)
    with pytest.raises(ConfigError, match="at least 2 training rows"):
        mlp_probe(xtr[:2], torch.tensor([0, 0]), xte, yte)


# --------------------------------------------------------------------------------------------------
# weighted k-NN


def naive_knn(train_x, train_y, query_x, k, temperature):
    """Per-query loop: cosine similarity in float64, top-k, class score = sum of exp(sim / T)."""
    train = [[float(v) for v in row] for row in train_x]
    labels = [int(v) for v in train_y]
    num_classes = max(labels) + 1
    out = []
    for q in query_x:
        q = [float(v) for v in q]
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for i, t in enumerate(train):
            tn = math.sqrt(sum(v * v for v in t))
            sims.append((sum(a * b for a, b in zip(q, t)) / (qn * tn), i))
        sims.sort(reverse=True)
        scores = [0.0] * num_classes
        for s, i in sims[:k]:
            scores[labels[i]] += math.exp(s / temperature)
        out.append(max(range(num_classes), key=lambda c: (scores[c], -c)))
    return torch.tensor(out)


@pytest.mark.parametrize("shortlist", ["off", "bf16"])
@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (1000, 0.1)])
def test_knn_predict_matches_naive_loop(k, temperature, shortlist):
    g = torch.Generator().manual_seed(k)
    train_x, query_x = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    train_y = torch.randint(0, 5, (60,), generator=g)
    pred = knn_predict(train_x, train_y, query_x, k=k, temperature=temperature, chunk=7, shortlist=shortlist)
    assert pred.dtype == torch.int64 and pred.shape == (25,)
    assert torch.equal(pred, naive_knn(train_x, train_y, query_x, min(k, 60), temperature))
    assert len(set(pred.tolist())) > 1


def grouped_unit_rows(n: int, noise: float, seed: int, dim: int = 256) -> torch.Tensor:
    """Unit rows in groups of 50 around 60 fixed centres (the same for every ``seed``; ``seed`` draws the
    noise): near the top of a query's neighbours similarities differ by ~1e-3-1e-2, where a bfloat16
    product (8 significant bits) already orders some neighbours differently from float32."""
    centres = torch.randn(60, dim, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    x = centres.repeat_interleave(50, 0)[:n] + noise * torch.randn(n, dim, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def test_bf16_shortlist_returns_the_float32_neighbours_and_similarities():
    bank = grouped_unit_rows(3000, 0.3, seed=1)
    queries = grouped_unit_rows(3000, 0.3, seed=2)[::10]
    exclude = torch.arange(0, 3000, 7)
    for excl in (None, exclude):
        want_sim = queries @ bank.t()
        if excl is not None:
            want_sim[:, excl] = -math.inf
        want_sim, want_idx = want_sim.topk(20, dim=1)
        low_sim = queries.bfloat16() @ bank.bfloat16().t()
        if excl is not None:
            low_sim[:, excl] = -math.inf
        assert not torch.equal(low_sim.float().topk(20, dim=1).indices, want_idx)  # bf16 alone would differ
        sim, idx = probes._top_neighbours(queries, bank, bank.bfloat16(), 20, excl)
        assert sim.dtype == torch.float32
        # the same neighbours with the same float32 similarities (rows that tie to float32 rounding, ~1e-7,
        # may come in either order: the re-scoring sums in another order than the full product)
        assert torch.equal(idx.sort(1).values, want_idx.sort(1).values)
        torch.testing.assert_close(sim, want_sim, rtol=0, atol=1e-6)
        assert (idx == want_idx).float().mean() > 0.99


def test_knn_probe_is_the_same_with_and_without_the_bf16_shortlist():
    x, xte = grouped_unit_rows(3000, 1.0, seed=1), grouped_unit_rows(3000, 1.0, seed=2)[::6]
    g = torch.Generator().manual_seed(3)
    group_label = torch.randint(0, 7, (60,), generator=g)
    y, yte = group_label.repeat_interleave(50), group_label.repeat_interleave(50)[::6]
    y = torch.where(torch.rand(3000, generator=g) < 0.3, torch.randint(0, 7, (3000,), generator=g), y)
    yte = torch.where(torch.rand(500, generator=g) < 0.3, torch.randint(0, 7, (500,), generator=g), yte)
    off = knn_probe(x, y, xte, yte, k=(5, 20), temperature=(0.02, 0.2), shortlist="off")
    low = knn_probe(x, y, xte, yte, k=(5, 20), temperature=(0.02, 0.2), shortlist="bf16")
    assert 0.5 < off.test_acc < 1.0 and 0.5 < off.val_acc < 1.0
    assert (low.test_acc, low.val_acc, low.chosen, low.grid) == (off.test_acc, off.val_acc, off.chosen, off.grid)
    assert torch.equal(knn_predict(x, y, xte, shortlist="bf16"), knn_predict(x, y, xte, shortlist="off"))


def test_knn_shortlist_must_be_known():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(ConfigError, match="shortlist must be auto, bf16 or off"):
        knn_predict(x, y, x, shortlist="fp16")


def test_knn_k_larger_than_train_set():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    query = torch.tensor([[0.1, 1.0], [1.0, 0.2]])
    pred = knn_predict(train_x, train_y, query, k=50, temperature=0.1)
    assert torch.equal(pred, naive_knn(train_x, train_y, query, 3, 0.1))
    assert pred.tolist() == [1, 0]
    assert knn_predict(train_x, train_y, train_x, k=1).tolist() == [0, 0, 1]


def test_knn_probe_blobs_and_no_leak_from_val():
    xtr, ytr, xte, yte = blobs()
    r = knn_probe(xtr, ytr, xte, yte, k=10)
    assert (r.test_acc, r.val_acc, r.name) == (1.0, 1.0, "knn")
    assert r.chosen == {"k": 10, "temperature": 0.07} and r.grid == [{"k": 10, "temperature": 0.07, "val_acc": 1.0}]
    # noise labels on near-orthogonal points: a val point that could see itself would score ~100%
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(400, 256, generator=g), torch.randint(0, 4, (400,), generator=g)
    noise = knn_probe(x, y, x, y, k=5)
    assert noise.val_acc < 0.5
    assert noise.test_acc == 1.0  # test queries see the whole training set, their own copies included


def overlapping_blobs():
    """Blobs that overlap enough for k and T to matter (10 classes, val split of 60 rows)."""
    return blobs(n_train=600, n_test=300, classes=10, dim=8, spread=0.9, seed=4)


def test_knn_probe_sweep_picks_best_pair():
    xtr, ytr, xte, yte = overlapping_blobs()
    ks, temps = (1, 5, 25), (0.02, 0.5)
    r = knn_probe(xtr, ytr, xte, yte, k=ks, temperature=temps, chunk=100)
    assert r.name == "knn"
    assert [(g["k"], g["temperature"]) for g in r.grid] == [(k, t) for k in ks for t in temps]
    singles = {(k, t): knn_probe(xtr, ytr, xte, yte, k=k, temperature=t, chunk=100) for k in ks for t in temps}
    for g in r.grid:  # each pair scored as the single-value probe scores it
        assert g["val_acc"] == singles[g["k"], g["temperature"]].val_acc
    assert len({g["val_acc"] for g in r.grid}) > 2
    # measured (60 validation rows): 36, 36, 38, 43, 40 and 44 correct; the largest k and T win
    assert [round(g["val_acc"] * 60) for g in r.grid] == [36, 36, 38, 43, 40, 44]
    best = (25, 0.5)
    assert r.chosen == {"k": best[0], "temperature": best[1]}
    assert r.val_acc == max(g["val_acc"] for g in r.grid) == singles[best].val_acc
    assert r.test_acc == singles[best].test_acc


def test_knn_probe_single_value_is_the_plain_probe():
    xtr, ytr, xte, yte = overlapping_blobs()
    r = knn_probe(xtr, ytr, xte, yte, k=7, temperature=0.1, seed=3)
    # reference: val rows classified from the train part only, test rows from the whole training set
    tr, va = stratified_split(ytr, 0.1, seed=3)
    val = accuracy(knn_predict(xtr[tr], ytr[tr], xtr[va], k=7, temperature=0.1), ytr[va])
    test = accuracy(knn_predict(xtr, ytr, xte, k=7, temperature=0.1), yte)
    assert (r.val_acc, r.test_acc) == (val, test)
    assert r.chosen == {"k": 7, "temperature": 0.1} and r.grid == [{"k": 7, "temperature": 0.1, "val_acc": val}]
    assert knn_probe(xtr, ytr, xte, yte, k=[7], temperature=(0.1,), seed=3) == r
    assert 0.3 < r.test_acc < 0.95


def test_knn_sweep_selection_ignores_test_labels(monkeypatch):
    xtr, ytr, xte, yte = overlapping_blobs()
    sweep = {"k": (1, 10, 30), "temperature": (0.05, 0.2)}
    base = knn_probe(xtr, ytr, xte, yte, **sweep)
    perm = torch.randperm(yte.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = knn_probe(xtr, ytr, xte, yte[perm], **sweep)
    wrong = knn_probe(xtr, ytr, xte, (yte + 1) % 10, **sweep)
    for r in (shuffled, wrong):
        assert (r.chosen, r.val_acc, r.grid) == (base.chosen, base.val_acc, base.grid)
    assert len({base.test_acc, shuffled.test_acc, wrong.test_acc}) == 3
    # test data is read only after the validation sweep is done, by one single-pair query
    log: list = []
    original = probes._knn_from_bank

    def logged(*args, **kwargs):
        out = original(*args, **kwargs)
        log.append(("knn", len(kwargs["pairs"])))
        return out

    monkeypatch.setattr(probes, "_knn_from_bank", logged)
    r = knn_probe(xtr, ytr, spy(xte, "test_x", log), spy(yte, "test_y", log), **sweep)
    assert r.test_acc == base.test_acc
    calls = [i for i, (tag, _) in enumerate(log) if tag == "knn"]
    reads = [i for i, (tag, _) in enumerate(log) if tag in ("test_x", "test_y")]
    assert [log[i][1] for i in calls] == [6, 1]
    assert any(log[i][0] == "test_y" for i in reads) and any(log[i][0] == "test_x" for i in reads)
    assert min(reads) > calls[0], log


def test_knn_sweep_errors():
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    cases = [
        ({"k": ()}, "empty grid"),
        ({"temperature": []}, "empty grid"),
        ({"k": (5, 0)}, "k must be >= 1, got 0"),
        ({"k": 2.5}, "k must be an integer"),
        ({"temperature": (0.1, -1.0)}, "temperature must be > 0"),
        ({"temperature": "0.1"}, "temperature must be a number or a sequence"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            knn_probe(x, y, x, y, **kwargs)


def test_knn_errors():
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    with pytest.raises(ConfigError, match="k must be >= 1, got 0"):
        knn_predict(x, y, x, k=0)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        knn_predict(x, y, x, temperature=0.0)
    with pytest.raises(ConfigError, match="chunk must be >= 1"):
        knn_predict(x, y, x, chunk=0)
    with pytest.raises(ConfigError, match="train_y has 5 labels but the features have 6 rows"):
        knn_predict(x, y[:5], x)
    with pytest.raises(ConfigError, match="query_x must be a 2-D tensor with 3 features"):
        knn_predict(x, y, x[:, :2])
    with pytest.raises(ConfigError, match="negative class id"):
        knn_predict(x, y - 1, x)
    with pytest.raises(ConfigError, match="test_y has 5 labels but the features have 6 rows"):
        knn_probe(x, y, x, y[:5])


def test_accuracy():
    assert accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
    with pytest.raises(ConfigError, match="equal length"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError, match="empty"):
        accuracy(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
