"""Every registered method builds from its shipped recipes and trains a few steps with a falling loss."""

import json
import math

import pytest
import torch
from test_train import make_blobs

from onepoch import methods
from onepoch.errors import ConfigError
from onepoch.runconfig import load_config
from onepoch.train import build_model, train

SYMMETRIC = ["simclr", "vicreg", "barlow_twins"]
SMALL = ["model.arch=resnet10", "model.width=0.0625", "data.batch_size=8", "views.size=12",
         "train.threads=1", "train.checkpoint_every=100"]


def test_registry_lists_every_method():
    assert set(methods.names()) >= {"emp_ssl", *SYMMETRIC}
    with pytest.raises(ConfigError, match="did you mean 'vicreg'"):
        methods.get("vicrge")


@pytest.mark.parametrize("name", SYMMETRIC)
def test_shipped_recipes_load(name):
    for recipe in ("fashion_mnist_1epoch", "cifar10"):
        config = load_config(f"{name}/{recipe}")
        assert config.method["name"] == name
    with pytest.raises(ConfigError, match="unknown method key 'eps'"):
        load_config(f"{name}/fashion_mnist_1epoch", ["method.eps=0.2"])


@pytest.mark.parametrize("name", SYMMETRIC)
def test_method_trains_with_finite_decreasing_loss(tmp_path, name):
    root = make_blobs(tmp_path / "blobs", n_train=96)
    projector = {"simclr": "32-16", "vicreg": "32-32", "barlow_twins": "32-32"}[name]
    config = load_config(f"{name}/fashion_mnist_1epoch",
                         [*SMALL, f"data.root={root}", f"train.out={tmp_path}", f"method.projector={projector}",
                          "train.epochs=3", "optim.name=adamw", "optim.lr=0.003"])
    result = train(config, progress_bar=False)
    assert result.steps == 36
    losses = [json.loads(line)["loss"] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < first, (name, first, last)


@pytest.mark.parametrize("name", SYMMETRIC)
def test_more_than_two_views(tmp_path, name):
    config = load_config(f"{name}/fashion_mnist_1epoch", [*SMALL, "method.projector=16-16"])
    torch.manual_seed(0)
    model = build_model(config, 1)
    loss, parts, feats = model(torch.randn(3 * 4, 1, 12, 12), 3)
    assert feats.shape == (12, model.backbone.feature_dim)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and parts
