"""Embeddings (bag, full, map2x2, grid) and `onepoch eval` on a trained tiny run."""

import json

import numpy as np
import pytest
import torch
from test_train import blobs, tiny_config  # noqa: F401  (fixture)

from onepoch.cli import main
from onepoch.errors import ConfigError
from onepoch.eval import embed_split, grid_patches
from onepoch.run import build_model, view_spec_for
from onepoch.runconfig import load_config
from onepoch.train import train


def test_grid_patches_cover_the_image_in_order():
    img = torch.arange(12 * 12, dtype=torch.float32).view(1, 12, 12, 1)
    u8 = img.clamp(max=255).to(torch.uint8)
    tiles, count = grid_patches(u8, crop=6, out_size=6, mean=[0.0], std=[1 / 255])
    assert count == 9  # starts 0, 3, 6 on each axis
    assert tiles.shape == (9, 1, 6, 6)
    assert torch.allclose(tiles[0, 0], u8[0, :6, :6, 0].float(), atol=1e-4)
    assert torch.allclose(tiles[5, 0], u8[0, 3:9, 6:12, 0].float(), atol=1e-4)  # row 1, column 2
    tiles, count = grid_patches(torch.zeros(2, 28, 28, 1, dtype=torch.uint8), crop=14, out_size=16,
                                mean=[0.0], std=[1.0])
    assert (count, tiles.shape) == (9, (18, 1, 16, 16))


def test_embeddings_shapes_and_determinism(tmp_path, blobs):  # noqa: F811
    config = tiny_config(tmp_path, blobs)
    torch.manual_seed(0)
    model = build_model(config, 1)
    from onepoch.data.prepared import open_split

    split = open_split(blobs, "train")
    spec = view_spec_for(config, split.mean, split.std, count=3)
    images = np.asarray(split.images)
    width = model.backbone.feature_dim
    kw = dict(spec=spec, batch_size=20, device=torch.device("cpu"), seed=0)
    bag = embed_split(model, images, "bag", **kw)
    assert bag.shape == (64, model.pre_feature_dim)
    assert torch.equal(bag, embed_split(model, images, "bag", **kw))
    assert not torch.equal(bag, embed_split(model, images, "bag", **{**kw, "seed": 1}))
    assert embed_split(model, images, "full", **kw).shape == (64, width)
    assert embed_split(model, images, "map2x2", **kw).shape == (64, 4 * width)
    crop = round(0.5 * 12)  # crop_scale 0.25 of a 12x12 image -> 6x6 crops at stride 3: 3x3 grid
    assert crop == 6 and embed_split(model, images, "grid", **kw).shape == (64, 9 * width)
    # eval.layer: what bag and full read (auto: pre_feature for the bag, backbone for full).
    projector_dim = int(config.method["projector"].split("-")[-1])
    assert embed_split(model, images, "full", layer="projector", **kw).shape == (64, projector_dim)
    assert embed_split(model, images, "bag", layer="backbone", **kw).shape == (64, width)
    with pytest.raises(ConfigError, match="eval.layer 'pre_feature' does not exist in this model"):
        simclr = build_model(load_config("simclr/fashion_mnist_1epoch", ["model.width=0.0625", "model.arch=resnet10"]), 1)
        embed_split(simclr, images, "full", layer="pre_feature", **kw)
    with pytest.raises(ConfigError, match="unknown eval.layer 'projektor'.*did you mean 'projector'"):
        tiny_config(tmp_path, blobs, "eval.layer=projektor")
    # Batching does not change the result.
    a = embed_split(model, images, "map2x2", **kw)
    b = embed_split(model, images, "map2x2", **{**kw, "batch_size": 7})
    assert torch.allclose(a, b, atol=1e-5)


def test_onepoch_eval_writes_eval_json(tmp_path, blobs, capsys):  # noqa: F811
    config = tiny_config(tmp_path, blobs, "train.max_steps=4")
    train(config, progress_bar=False)
    rc = main(["eval", str(config.run_dir), "--probe", "linear,knn", "--features", "full,map2x2", "eval.knn_k=5"])
    assert rc == 0
    report = json.loads((config.run_dir / "eval.json").read_text())
    assert report["step"] == 4 and report["checkpoint"] == "step_0000004.pt"
    assert set(report["results"]) == {"full", "map2x2"}
    for entry in report["results"].values():
        assert entry["knn"]["chosen"]["k"] == 5
    # The blobs' class is the position of a bright square: the whole-image features of even a barely
    # trained network separate it (measured over 3 data seeds: full 0.78-1.0, map2x2 0.88-1.0, linear
    # and k-NN); chance is 0.25, and 0.6 of 32 test images is 4 binomial standard deviations above it.
    assert report["results"]["map2x2"]["linear"]["test_acc"] >= 0.75
    assert report["results"]["map2x2"]["knn"]["test_acc"] >= 0.75
    assert report["results"]["full"]["linear"]["test_acc"] >= 0.6
    out = capsys.readouterr().out
    assert "linear %" in out and "map2x2" in out
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["eval", str(config.run_dir), "--features", "bagg"]) == 2
    assert "did you mean 'bag'" in capsys.readouterr().err


def test_cli_train_errors_are_one_line(tmp_path, blobs, capsys):  # noqa: F811
    assert main(["train", "emp_ssl/fashion_mnist_demo", f"data.root={blobs}", "optim.lr=-0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "onepoch: error: optim.lr must be a finite number > 0, got -0.1"
    assert main(["train", "emp_ssl/fashion_mnist_demo", f"data.root={tmp_path / 'missing'}",
                 f"train.out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onepoch: error:") and "missing" in err and len(err.splitlines()) == 1
    assert main(["train", "emp_ssl/fashion_mnist_demo", f"data.root={blobs}", f"train.out={tmp_path}",
                 "data.batch_size=1000"]) == 2
    assert "larger than the train split" in capsys.readouterr().err


def test_cli_train_then_eval_and_resume(tmp_path, blobs, capsys):  # noqa: F811
    from test_train import TINY

    args = ["train", "emp_ssl/fashion_mnist_demo", *TINY, f"data.root={blobs}", f"train.out={tmp_path}",
            "name=cli", "train.max_steps=3", "eval.features=[full]", "eval.probes=[knn]"]
    assert main([*args, "--eval"]) == 0
    out = capsys.readouterr().out
    assert "trained to step 3" in out and "wrote" in out
    report = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert report["step"] == 3 and set(report["results"]["full"]) == {"dim", "knn", "embed_seconds", "test_images"}
    assert main(args) == 2  # the run exists: refuse to overwrite it
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert main([*args[:-3], "name=cli", "eval.features=[full]", "eval.probes=[knn]", "--resume"]) == 0
    assert "trained to step 8" in capsys.readouterr().out  # 64 images / 8 per step: the epoch's end
