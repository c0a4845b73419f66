"""EMP-SSL's official evaluation (``eval.protocol: paper``) against an independent reference, and end to end.

``tests/reference/paper_probes.npz`` holds fixed features and what the official code's linear-probe loop
(PyTorch's DataLoader, nn.Linear, SGD, CosineAnnealingLR) and lightly's weighted k-NN computed on them in the
reference environment (``tests/reference/make_paper_probe_reference.py``). Our probe replays the same initial
weights and batch orders; the per-epoch test accuracies must agree, and the final weights to float rounding.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import make_blobs, tiny_config

from onepoch.cli import main
from onepoch.errors import ConfigError
from onepoch.eval import merge_results
from onepoch.paper_probes import paper_knn_probe, paper_linear_probe
from onepoch.train import train

FIXTURE = Path(__file__).parent / "reference" / "paper_probes.npz"


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _tensors(ref):
    return (torch.from_numpy(ref["train_x"]), torch.from_numpy(ref["train_y"]),
            torch.from_numpy(ref["test_x"]), torch.from_numpy(ref["test_y"]))


def test_paper_linear_probe_replays_the_official_loop(ref):
    xtr, ytr, xte, yte = _tensors(ref)
    init = (torch.from_numpy(ref["init_weight"]), torch.from_numpy(ref["init_bias"]))
    orders = [torch.from_numpy(o.astype(np.int64)) for o in ref["orders"]]
    result = paper_linear_probe(xtr, ytr, xte, yte, num_classes=5, init=init, epoch_orders=orders)
    expected = ref["test_acc"]
    assert len(result.test_acc_per_epoch) == 100
    # the reference's accuracies are float32 means (~1e-8 off an exact count); 300 test rows, one row is 1/300:
    # float rounding elsewhere may move a row that sits on a decision boundary in at most a few epochs
    diffs = np.abs(np.asarray(result.test_acc_per_epoch) - expected)
    assert diffs.max() <= 1 / 300 + 1e-6 and (diffs > 1e-6).sum() <= 3
    assert result.last_test_acc == pytest.approx(expected[-1], abs=1 / 300 + 1e-6)
    assert result.best_test_acc == pytest.approx(expected.max(), abs=1 / 300 + 1e-6)
    assert 0.3 < expected[-1] < 0.95  # the fixture is not saturated: the comparison can fail
    assert result.best_epoch == int(np.argmax(np.asarray(result.test_acc_per_epoch))) + 1


def test_paper_linear_probe_final_weights_match(ref):
    """The weights after 100 epochs, not only the accuracies, follow the official loop."""
    xtr, ytr, xte, yte = _tensors(ref)
    result = paper_linear_probe(xtr, ytr, xte, yte, num_classes=5,
                                init=(torch.from_numpy(ref["init_weight"]), torch.from_numpy(ref["init_bias"])),
                                epoch_orders=[torch.from_numpy(o.astype(np.int64)) for o in ref["orders"]])
    scale = np.abs(ref["final_weight"]).max()
    np.testing.assert_allclose(result.weight.numpy(), ref["final_weight"], rtol=0, atol=1e-4 * scale)


def test_paper_knn_matches_lightly(ref):
    xtr, ytr, xte, yte = _tensors(ref)
    # the reference is a float32 mean of 300 hits (~1e-8 off the exact count)
    assert paper_knn_probe(xtr, ytr, xte, yte, num_classes=5) == pytest.approx(float(ref["knn_acc"]), abs=1e-6)


def test_paper_linear_probe_defaults_and_errors():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(150, 4, generator=g), torch.arange(150) % 3
    a = paper_linear_probe(x, y, x[:30], y[:30], seed=1, epochs=3)
    b = paper_linear_probe(x, y, x[:30], y[:30], seed=1, epochs=3)
    assert a == b  # seeded: the same run twice
    with pytest.raises(ConfigError, match="fewer than one batch of 100"):
        paper_linear_probe(x[:99], y[:99], x, y)
    with pytest.raises(ConfigError, match="epoch_orders has 2 orders for 3 epochs"):
        paper_linear_probe(x, y, x, y, epochs=3, epoch_orders=[torch.arange(150)] * 2)


def test_merge_results_keeps_earlier_probes_and_replaces_changed_features():
    earlier = {"full": {"dim": 8, "test_images": 10, "linear": {"test_acc": 0.5}},
               "bag": {"dim": 8, "test_images": 10, "patches": 16, "linear": {"test_acc": 0.6}}}
    new = {"full": {"dim": 8, "test_images": 10, "knn": {"test_acc": 0.4}},
           "bag": {"dim": 8, "test_images": 10, "patches": 128, "paper_knn": {"test_acc": 0.7}}}
    merged = merge_results(earlier, new)
    assert merged["full"]["linear"] == {"test_acc": 0.5} and merged["full"]["knn"] == {"test_acc": 0.4}
    assert "linear" not in merged["bag"] and merged["bag"]["patches"] == 128
    assert earlier["full"].keys() == {"dim", "test_images", "linear"}  # inputs untouched


@pytest.mark.slow
def test_eval_protocols_end_to_end(tmp_path, capsys):
    data = make_blobs(tmp_path / "blobs", n_train=200, n_test=40)
    config = tiny_config(tmp_path, data, "train.max_steps=3")
    train(config, progress_bar=False)
    run = str(config.run_dir)
    assert main(["eval", run, "--features", "full", "--probe", "linear", "eval.knn_k=5"]) == 0
    assert main(["eval", run, "--protocol", "both", "--features", "full", "--probe", "knn", "--bag-patches", "2",
                 "eval.knn_k=5"]) == 0
    report = json.loads((config.run_dir / "eval.json").read_text())
    results = report["results"]
    assert set(results) == {"full", "bag"}
    assert set(results["full"]) >= {"linear", "knn"}  # the first evaluation's linear probe is kept
    assert results["full"]["linear"]["protocol"] == "onepoch"
    bag = results["bag"]
    assert bag["patches"] == 2 and bag["test_images"] == 40 and report["test_images"] == 40
    assert bag["knn"]["protocol"] == "onepoch"
    assert bag["paper_linear"]["protocol"] == "paper" and bag["paper_knn"]["protocol"] == "paper"
    assert bag["paper_linear"]["best_test_acc"] >= bag["paper_linear"]["test_acc"]
    assert bag["paper_linear"]["settings"] == {"lr": 0.03, "momentum": 0.9, "weight_decay": 5e-5,
                                               "batch_size": 100, "epochs": 100}
    assert bag["paper_knn"]["settings"] == {"k": 20, "temperature": 0.07}
    out = capsys.readouterr().out
    assert "best-ep* %" in out and "chosen on the test set" in out
    # the paper protocol alone computes the bag only and runs no onepoch probe on it
    assert main(["eval", run, "--protocol", "paper", "--bag-patches", "3"]) == 0
    bag = json.loads((config.run_dir / "eval.json").read_text())["results"]["bag"]
    assert bag["patches"] == 3 and {"paper_linear", "paper_knn"} <= set(bag) and "knn" not in bag
    assert main(["eval", run, "eval.protocol=papr"]) == 2
    assert "did you mean 'paper'" in capsys.readouterr().err


def test_paper_recipes_reproduce_the_official_readme_rows():
    """emp_ssl/<cifar>_1epoch: the 1-epoch table's command (`--epoch 2`: the cosine spans two epochs, no
    warmup, lr 0.15 after the first); <cifar>_1epoch_schedule30: the 30-epoch table's first epoch."""
    from onepoch.runconfig import load_config

    for data in ("cifar10", "cifar100"):
        headline = load_config(f"emp_ssl/{data}_1epoch")
        thirty = load_config(f"emp_ssl/{data}_1epoch_schedule30")
        for config in (headline, thirty):
            assert (config.train.epochs, config.optim.warmup_steps, config.optim.lr) == (1, 0, 0.3)
            assert (config.views["count"], config.data.batch_size) == (20, 100)
            assert (config.eval.bag_patches, config.train.amp) == (128, "auto")
            # the official dataset/aug.py: Normalize([0.5] * 3, [0.5] * 3) on every patch
            assert (config.view_specs[0].mean, config.view_specs[0].std) == ((0.5,) * 3, (0.5,) * 3)
        assert (headline.optim.schedule_epochs, thirty.optim.schedule_epochs) == (2, 30)
        assert thirty.name == f"emp_ssl_{data}_1epoch_schedule30"
    # the official code trains in fp32: `train.amp=off` on the command line (YAML reads off as false)
    assert load_config("emp_ssl/cifar10_1epoch", ["train.amp=off"]).train.amp == "off"
    assert load_config("emp_ssl/cifar10_1epoch", ["train.channels_last=off"]).train.channels_last == "off"
    with pytest.raises(ConfigError, match="train.amp must be one of auto, bf16, off, got True"):
        load_config("emp_ssl/cifar10_1epoch", ["train.amp=on"])
