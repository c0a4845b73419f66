"""Every registered method builds from its shipped recipes and, with its recipe's optimizer, trains a few steps
with a loss that falls by more than its noise."""

import json
import math
import statistics

import pytest
import torch
from test_train import make_blobs

from onepoch import methods
from onepoch.errors import ConfigError
from onepoch.run import build_model
from onepoch.runconfig import load_config
from onepoch.train import train

SYMMETRIC = ["simclr", "vicreg", "barlow_twins"]
BASELINES = [*SYMMETRIC, "byol", "swav", "ressl"]
RECIPES = {"emp_ssl": "emp_ssl/fashion_mnist_demo"}  # the others: <method>/fashion_mnist_1epoch
TINY_HEADS = {"emp_ssl": ["method.pre_feature=32", "method.projector=32-16"],
              "simclr": ["method.projector=32-16"], "vicreg": ["method.projector=32-32"],
              "barlow_twins": ["method.projector=32-32"],
              "byol": ["method.projector=32-16", "method.predictor=32-16"],
              "swav": ["method.projector=32-16", "method.prototypes=8", "method.queue_size=16",
                       "method.freeze_prototypes_steps=2"],
              "ressl": ["method.projector=32-16", "method.queue_size=64", "method.momentum=0.9"]}
SMALL = ["model.arch=resnet10", "model.width=0.0625", "data.batch_size=8", "views.size=12",
         "train.threads=1", "train.checkpoint_every=100"]


def test_registry_lists_every_method():
    assert set(methods.names()) == {"emp_ssl", *BASELINES}
    with pytest.raises(ConfigError, match="did you mean 'vicreg'"):
        methods.get("vicrge")


@pytest.mark.parametrize("name", BASELINES)
def test_shipped_recipes_load(name):
    for recipe in ("fashion_mnist_1epoch", "cifar10", "cifar100"):
        config = load_config(f"{name}/{recipe}")
        assert config.method["name"] == name
        assert config.model.arch == ("resnet10" if recipe.startswith("fashion") else "resnet18")
        assert config.data.root.endswith({"cifar10": "cifar10", "cifar100": "cifar100"}.get(recipe, "fashion-mnist"))
    with pytest.raises(ConfigError, match="unknown method key 'eps'"):
        load_config(f"{name}/fashion_mnist_1epoch", ["method.eps=0.2"])


def test_method_specific_recipes():
    bordes = load_config("simclr/cifar10_bordes")
    assert (bordes.method["temperature"], bordes.optim.lr) == (0.15, 1.0)
    multicrop = load_config("swav/fashion_mnist_multicrop")
    assert [g.get("size") for g in multicrop.views["groups"]] == [28, 14]
    byol = load_config("byol/cifar10")
    assert [(g["blur_p"], g["solarize_p"]) for g in byol.views["groups"]] == [(1.0, 0.0), (0.1, 0.2)]


def fell(losses: list[float], window: int) -> tuple[float, float]:
    """(mean of the first ``window`` losses minus the mean of the last ``window``, the standard error of
    the last window's mean: sd / sqrt(window)). A loss that stays where it started (no learning)
    gives a fall within a few standard errors of 0."""
    first, last = losses[:window], losses[-window:]
    return sum(first) / window - sum(last) / window, statistics.stdev(last) / math.sqrt(window)


@pytest.mark.parametrize("name", ["emp_ssl", *BASELINES])
def test_method_trains_with_its_recipe_optimizer_and_the_loss_falls(tmp_path, name):
    """Three epochs of generated blobs (36 steps of 16 images) with the method's shipped recipe, so its
    optimizer and schedule (LARS, warmup then cosine; only the network is shrunk): every loss is
    finite, and the mean loss of the last third of the steps is below that of the first third by more
    than 3 standard errors of the last third's mean (measured falls: 5 to >100 standard errors)."""
    root = make_blobs(tmp_path / "blobs", n_train=192)
    config = load_config(RECIPES.get(name, f"{name}/fashion_mnist_1epoch"),
                         [*SMALL, f"data.root={root}", f"train.out={tmp_path}", *TINY_HEADS[name],
                          "data.batch_size=16", "train.epochs=3", "train.log_every=1"])
    assert config.optim.name == "lars"
    result = train(config, progress_bar=False)
    assert result.steps == 36
    # ReSSL's loss includes the teacher's entropy, which changes as the queue fills: follow its KL part.
    key = "kl" if name == "ressl" else "loss"
    losses = [json.loads(line)[key] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 36 and all(math.isfinite(x) for x in losses)
    drop, stderr = fell(losses, window=12)
    assert drop > 3 * stderr, (name, drop, stderr, losses)


@pytest.mark.parametrize("name", BASELINES)
def test_more_than_two_views(tmp_path, name):
    config = load_config(f"{name}/fashion_mnist_1epoch", [*SMALL, *TINY_HEADS[name]])
    torch.manual_seed(0)
    model = build_model(config, 1)
    loss, parts, feats = model([torch.randn(1, 4, 1, 12, 12), torch.randn(2, 4, 1, 12, 12)])
    student_views = 2 if name == "ressl" else 3  # ReSSL's first group is the teacher's
    assert feats.shape == (student_views * 4, model.backbone.feature_dim)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and parts
