"""Tests that would catch an evaluation bug, against written-out expectations and per-image references.

Each test here was written to fail on one of the deliberate bugs of ``scripts/eval_mutations.py`` (the
probes choosing the worst setting, a refit ignoring the choice, statistics that see the validation rows,
bags and grids mixing images, ``eval.bag_patches`` ignored, a reversed k-NN tie-break, changed defaults
and paper presets). Expected choices are written out from the data, never recomputed with the code's
own sort key.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_probes import one_thread  # noqa: F401  (autouse fixture)
from test_train import blobs, tiny_config  # noqa: F401  (fixture)
from torch import nn

from onepoch import probes
from onepoch.eval import embed_split, evaluate_model
from onepoch.probes import knn_probe, linear_probe, mlp_probe, stratified_split
from onepoch.errors import ConfigError
from onepoch.run import eval_amp, eval_max_patches
from onepoch.runconfig import EvalConfig, build_config
from onepoch.views import PRESETS, ViewSpec


def one_signal(n_train: int = 120, n_test: int = 400, dim: int = 60, seed: int = 0):
    """Two balanced classes told apart by feature 0 alone (means -1.2 and +1.2, unit noise) among 59 noise
    features: with 90 training rows a probe overfits the noise unless it is regularised, so the settings of
    a sweep score differently on validation."""
    g = torch.Generator().manual_seed(seed)
    ytr, yte = torch.arange(n_train) % 2, torch.arange(n_test) % 2
    xtr, xte = torch.randn(n_train, dim, generator=g), torch.randn(n_test, dim, generator=g)
    xtr[:, 0] += 1.2 * (2 * ytr - 1)
    xte[:, 0] += 1.2 * (2 * yte - 1)
    return xtr, ytr, xte, yte


LINEAR_SWEEP = {"weight_decays": (0.0, 0.1, 1.0), "epochs": (2, 20), "lr": 1e-2, "batch_size": 32,
                "val_fraction": 0.25}


# --------------------------------------------------------------------------------------------------
# linear probe: the choice, the refit, the statistics


def test_linear_probe_chooses_the_best_validation_setting():
    xtr, ytr, xte, yte = one_signal()
    r = linear_probe(xtr, ytr, xte, yte, **LINEAR_SWEEP)
    # measured on this data (30 validation rows): the settings do not tie, the strongest decay trained
    # longest is best, no decay stopped early is worst
    by_setting = {(g["weight_decay"], g["epochs"]): round(g["val_acc"] * 30) for g in r.grid}
    assert by_setting == {(0.0, 2): 21, (0.1, 2): 21, (1.0, 2): 23, (0.0, 20): 22, (0.1, 20): 23, (1.0, 20): 25}
    assert r.chosen == {"weight_decay": 1.0, "epochs": 20, "lr": 1e-2}
    assert r.val_acc == 25 / 30


def separable(n: int = 150, classes: int = 3, dim: int = 6):
    """Blobs far apart: every probe setting scores 1.0 on validation, so the choice is the tie-break's."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g) * 8
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_linear_probe_ties_go_to_fewer_epochs_then_larger_decay():
    x, y = separable()
    r = linear_probe(x, y, x[:30], y[:30], weight_decays=(1e-4, 0.0, 1e-3), epochs=(4, 2), batch_size=32)
    assert {g["val_acc"] for g in r.grid} == {1.0}
    assert r.chosen == {"weight_decay": 1e-3, "epochs": 2, "lr": 1e-3}


def test_linear_probe_final_refit_uses_the_chosen_setting():
    xtr, ytr, xte, yte = one_signal()
    r = linear_probe(xtr, ytr, xte, yte, **LINEAR_SWEEP)
    alone = linear_probe(xtr, ytr, xte, yte, **{**LINEAR_SWEEP, "weight_decays": (1.0,), "epochs": (20,)})
    assert alone.chosen == r.chosen
    assert r.test_acc == alone.test_acc
    # and another setting's refit scores differently on test, so the comparison can fail
    other = linear_probe(xtr, ytr, xte, yte, **{**LINEAR_SWEEP, "weight_decays": (0.0,), "epochs": (20,)})
    assert other.test_acc != r.test_acc


@pytest.mark.parametrize("probe", ["linear", "mlp"])
def test_standardisation_statistics_exclude_the_validation_rows(monkeypatch, probe):
    """Selection standardises with the statistics of the train part of the split alone; the final probe with
    those of every training row."""
    seen: list[set[int]] = []
    original = probes._standardised_copy

    def spy(x, order, n_stat, out):
        seen.append(set(order[:n_stat].tolist()))
        return original(x, order, n_stat, out)

    monkeypatch.setattr(probes, "_standardised_copy", spy)
    xtr, ytr, xte, yte = one_signal()
    if probe == "linear":
        linear_probe(xtr, ytr, xte, yte, weight_decays=(0.0,), epochs=(1,), val_fraction=0.25, seed=3)
    else:
        mlp_probe(xtr, ytr, xte, yte, hidden=(4,), dropouts=(0.0,), epochs=(1,), val_fraction=0.25, seed=3)
    train_part, val_part = stratified_split(ytr, 0.25, seed=3)
    assert len(val_part) == 30
    assert seen == [set(train_part.tolist()), set(range(120))]


def test_mlp_probe_chooses_the_best_validation_setting():
    xtr, ytr, xte, yte = one_signal()
    r = mlp_probe(xtr, ytr, xte, yte, hidden=(16,), dropouts=(0.0,), weight_decays=(0.0, 1.0), epochs=(1, 15),
                  lr=1e-2, batch_size=32, val_fraction=0.25)
    # measured on this data (30 validation rows)
    by_setting = {(g["weight_decay"], g["epochs"]): round(g["val_acc"] * 30) for g in r.grid}
    assert by_setting == {(0.0, 1): 19, (0.0, 15): 23, (1.0, 1): 21, (1.0, 15): 25}
    assert r.chosen == {"hidden": 16, "dropout": 0.0, "weight_decay": 1.0, "epochs": 15, "lr": 1e-2}
    assert r.val_acc == 25 / 30


# --------------------------------------------------------------------------------------------------
# k-NN: the sweep's choice and tie-break


def test_knn_sweep_ties_go_to_the_smaller_k_then_the_larger_temperature():
    x, y = separable()
    r = knn_probe(x, y, x[:30], y[:30], k=(5, 1, 3), temperature=(0.1, 0.5, 0.02))
    assert {g["val_acc"] for g in r.grid} == {1.0}
    assert r.chosen == {"k": 1, "temperature": 0.5}


def test_knn_sweep_chooses_the_best_validation_pair():
    xtr, ytr, xte, yte = one_signal(dim=3)
    r = knn_probe(xtr, ytr, xte, yte, k=(1, 5, 25), temperature=(0.05, 1.0), val_fraction=0.25)
    # measured on this data (30 validation rows): only the largest k with the largest T gets all 30
    by_pair = {(g["k"], g["temperature"]): round(g["val_acc"] * 30) for g in r.grid}
    assert by_pair == {(1, 0.05): 28, (1, 1.0): 28, (5, 0.05): 29, (5, 1.0): 29, (25, 0.05): 29, (25, 1.0): 30}
    assert r.chosen == {"k": 25, "temperature": 1.0} and r.val_acc == 1.0


# --------------------------------------------------------------------------------------------------
# features: a bag is the mean of that image's own views, a grid is that image's patches alone


class MeanPool(nn.Module):
    """A stand-in network whose "backbone" is each channel's mean over the pixels, counting the patches it sees."""

    feature_layers = ("backbone",)

    def __init__(self):
        super().__init__()
        self.patches = 0
        self.backbone = self._pool

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        self.patches += x.shape[0]
        return x.float().mean((2, 3))


PLAIN = ViewSpec(count=5, size=4, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0,
                 mean=(0.5,), std=(0.25,))


def test_bag_is_the_mean_of_each_images_own_views():
    """Flat images (each one grey level): every view of image i is flat at its level, so its bag is exactly
    that level, normalised; a bag mixing images or dividing by the wrong count is not."""
    levels = torch.tensor([0, 40, 90, 130, 200, 255, 17], dtype=torch.uint8)
    images = levels.view(-1, 1, 1, 1).expand(-1, 8, 8, 1).contiguous().numpy()
    expected = ((levels.float() / 255 - 0.5) / 0.25)[:, None]
    for batch_size, max_patches in ((7, 8192), (3, 4), (7, 10)):  # whole bags, and bags over several passes
        model = MeanPool()
        bag = embed_split(model, images, "bag", spec=PLAIN, batch_size=batch_size, device=torch.device("cpu"),
                          seed=0, max_patches=max_patches)
        assert torch.allclose(bag, expected, atol=1e-5), (batch_size, max_patches)
        assert model.patches == 7 * 5


def test_grid_is_each_images_own_patches_in_grid_order():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 12, 12, 1), generator=g, dtype=torch.uint8)
    spec = ViewSpec(count=1, size=6, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), mean=(0.0,), std=(1.0,))
    # 6x6 crops at stride 3 over 12x12: rows and columns start at 0, 3, 6; the feature is each crop's mean
    x = images.float() / 255
    expected = torch.stack([torch.stack([x[i, r:r + 6, c:c + 6].mean() for r in (0, 3, 6) for c in (0, 3, 6)])
                            for i in range(3)])
    # one pass for the batch; one image's 9 patches per pass (max 9 or 17); and a cap below one image's 9
    for max_patches, passes in ((8192, 1), (17, 3), (9, 3), (4, 3)):
        model = MeanPool()
        grid = embed_split(model, images.numpy(), "grid", spec=spec, batch_size=3, device=torch.device("cpu"),
                           seed=0, max_patches=max_patches)
        assert grid.shape == (3, 9)
        assert torch.allclose(grid, expected, atol=1e-5), max_patches
        assert model.patches == 27


class CountingPasses(nn.Module):
    """A backbone whose ``forward`` (each image's mean level) and ``forward_map`` (the image itself) record
    the rows of every pass."""

    def __init__(self):
        super().__init__()
        self.passes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append(x.shape[0])
        return x.float().mean((2, 3))

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append(x.shape[0])
        return x.float()


class CountingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = CountingPasses()


@pytest.mark.parametrize("kind", ["full", "map2x2"])
def test_whole_image_features_pass_at_most_max_patches_images_at_once(kind):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (10, 4, 4, 1), generator=g, dtype=torch.uint8).numpy()
    spec = ViewSpec(count=1, size=4, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), mean=(0.0,), std=(1.0,))
    results = []
    for max_patches in (8192, 3):
        model = CountingModel()
        results.append(embed_split(model, images, kind, spec=spec, batch_size=7, device=torch.device("cpu"), seed=0,
                                   max_patches=max_patches, layer="backbone"))
        passes = model.backbone.passes
        assert max(passes) == min(7, max_patches) and sum(passes) == 10
    assert torch.equal(results[0], results[1])


def test_evaluate_model_honours_bag_patches(tmp_path, blobs):  # noqa: F811
    from onepoch.data.prepared import open_split
    from onepoch.run import view_spec_for

    config = tiny_config(tmp_path, blobs, "eval.bag_patches=3", "eval.features=[bag]", "eval.probes=[knn]",
                         "views.count=4", "train.channels_last=off")
    train_split, test_split = open_split(blobs, "train"), open_split(blobs, "test")
    spec = view_spec_for(config, train_split.mean, train_split.std)
    assert spec.count == 4
    model = MeanPool()
    results = evaluate_model(model, config, device=torch.device("cpu"), train_split=train_split,
                             test_split=test_split, spec=spec, log=lambda *_: None)
    assert model.patches == (64 + 32) * 3  # 3 patches per image, not the training recipe's 4
    assert results["bag"]["patches"] == 3


# --------------------------------------------------------------------------------------------------
# pinned defaults and paper presets


def test_evaluation_defaults_are_pinned():
    ec = EvalConfig()
    assert ec.features == ("bag", "full") and ec.layer == "auto" and ec.protocol == "onepoch"
    assert ec.bag_patches == 16
    assert ec.probes == ("linear", "knn")
    assert ec.knn_k == (10, 20, 50)
    assert ec.knn_temperature == (0.04, 0.07, 0.1)
    assert ec.val_fraction == 0.1
    assert ec.linear_weight_decays == (0.0, 1e-4, 1e-3, 1e-2) and ec.linear_epochs == (10, 30)
    assert (ec.mlp_hidden, ec.mlp_dropouts, ec.mlp_weight_decays, ec.mlp_epochs) == ((512,), (0.0, 0.5), (0.0,), (5, 10))
    assert (ec.batch_size, ec.max_patches, ec.seed, ec.amp) == (500, None, 0, "auto")


@pytest.mark.parametrize("train_amp,eval_amp_setting,device,amx,want", [
    ("auto", "auto", "cpu", True, True),     # a CPU with native bf16: embed in bf16
    ("auto", "auto", "cpu", False, False),   # without it: float32
    ("off", "auto", "cpu", True, False),     # training asked for float32: evaluation follows
    ("bf16", "auto", "cpu", False, True),    # training in bf16: so is evaluation
    ("auto", "auto", "cuda", False, True),   # CUDA trains in bf16 by default
    ("off", "auto", "cuda", True, False),
    ("auto", "off", "cpu", True, False),     # eval.amp decides when it is not auto
    ("off", "bf16", "cpu", False, True),
])
def test_evaluation_precision(monkeypatch, train_amp, eval_amp_setting, device, amx, want):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    config = build_config({"train": {"amp": train_amp}, "eval": {"amp": eval_amp_setting}})
    assert eval_amp(config, torch.device(device)) is want


def test_evaluation_chunk_defaults_by_device():
    assert eval_max_patches(build_config({}), torch.device("cpu")) == 1024
    assert eval_max_patches(build_config({}), torch.device("cuda")) == 8192
    assert eval_max_patches(build_config({"eval": {"max_patches": 77}}), torch.device("cpu")) == 77
    with pytest.raises(ConfigError, match="eval.amp must be one of auto, bf16, off"):
        build_config({"eval": {"amp": "fp16"}})
    assert build_config({"eval": {"amp": False}}).eval.amp == "off"  # YAML's unquoted off


EMP_SSL_COLOUR = {"flip_p": 0.5, "jitter_p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.2,
                  "grayscale_p": 0.2, "blur_p": 0.1, "blur_sigma": (0.1, 2.0), "solarize_p": 0.1,
                  "solarize_threshold": 0.5}


def test_emp_ssl_presets_are_pinned_to_the_paper():
    """EMP-SSL's code (Tong et al. 2023): 0.25-area square crops, flip .5, jitter .4/.4/.4/.2 with p .8,
    grayscale .2, blur .1 (sigma 0.1-2), solarize .1."""
    cifar = PRESETS["emp_ssl_cifar"]
    assert cifar == ViewSpec(count=20, size=32, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), **EMP_SSL_COLOUR)
    imagenet = PRESETS["emp_ssl_imagenet"]
    assert imagenet == ViewSpec(count=20, size=224, crop_scale=(0.25, 0.25), crop_ratio=(3 / 4, 4 / 3),
                                interpolation="bicubic", **EMP_SSL_COLOUR)
    fashion = PRESETS["emp_ssl_fashion_mnist"]
    assert fashion == ViewSpec(count=16, size=16, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0),
                               **{**EMP_SSL_COLOUR, "saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0,
                                  "blur_sigma": (0.1, 1.0)})
    assert np.isclose(cifar.crop_scale[0] ** 0.5 * 32, 16)  # 16x16 crops of a 32x32 image


# --------------------------------------------------------------------------------------------------
# accuracy on fixed features, pinned to what the probes scored before they were made faster


def fixed_gaussian_features(n_train: int = 6000, n_test: int = 2000, dim: int = 64, classes: int = 10):
    """Overlapping Gaussian classes drawn from one seeded CPU generator: the same tensors on every run."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g) * (3.0 / dim ** 0.5)
    ytr = torch.randint(0, classes, (n_train,), generator=g)
    yte = torch.randint(0, classes, (n_test,), generator=g)
    return (centres[ytr] + 1.2 * torch.randn(n_train, dim, generator=g), ytr,
            centres[yte] + 1.2 * torch.randn(n_test, dim, generator=g), yte)


# Test accuracies of the probes as they were before the faster evaluation (hand-written Adam for the linear
# probe, float32 k-NN products), measured on fixed_gaussian_features() with the settings below.
PINNED_BEFORE = {"linear": 0.7710, "knn": 0.7755, "mlp": 0.7355}


@pytest.mark.parametrize("probe", sorted(PINNED_BEFORE))
def test_probe_accuracy_on_fixed_features_is_within_0_3_points_of_before(probe):
    xtr, ytr, xte, yte = fixed_gaussian_features()
    ec = EvalConfig()
    if probe == "linear":
        r = linear_probe(xtr, ytr, xte, yte, weight_decays=ec.linear_weight_decays, epochs=ec.linear_epochs)
    elif probe == "knn":
        r = knn_probe(xtr, ytr, xte, yte, k=ec.knn_k, temperature=ec.knn_temperature)
    else:
        r = mlp_probe(xtr, ytr, xte, yte, hidden=(64,), dropouts=ec.mlp_dropouts, weight_decays=ec.mlp_weight_decays,
                      epochs=ec.mlp_epochs)
    assert r.test_acc >= PINNED_BEFORE[probe] - 0.003
    assert r.test_acc <= PINNED_BEFORE[probe] + 0.02  # better is allowed; far better would need explaining
