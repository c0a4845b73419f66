"""The large-image recipes (ImageNet-100, Tiny ImageNet, STL-10): one CPU-sized epoch on generated data,
then eval; `onepoch views` on JPEG at rest; splits without labels ("labelled": false)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from onepoch.cli import main
from onepoch.data import SourceData, SplitArrays, load_source, open_split, write_prepared
from onepoch.data.encoded import EncodedSource
from onepoch.errors import ConfigError
from onepoch.eval import evaluate_run
from onepoch.runconfig import load_config
from onepoch.train import train
from test_encoded import jpeg_records, prepare
from test_source_large import make_stl10

RECIPES = ["emp_ssl/imagenet100_1epoch", "emp_ssl/tiny_imagenet_1epoch", "emp_ssl/stl10_1epoch",
           "simclr/imagenet100", "simclr/stl10", "byol/imagenet100", "vicreg/imagenet100"]

# Heads shrunk like tests/test_compare.py's cells: the recipe's structure at a CPU test's size.
HEADS = {
    "emp_ssl": ["method.pre_feature=32", "method.projector=32-16", "views.count=4"],
    "simclr": ["method.projector=32-16"],
    "byol": ["method.projector=32-16", "method.predictor=32-16"],
    "vicreg": ["method.projector=32-32"],
}
SHRINK = ["model.width=0.0625", "views.size=32", "data.batch_size=4", "data.decode_threads=1", "train.threads=1",
          "train.checkpoint_every=100"]
CHEAP_EVAL = {"eval.bag_patches": 2, "eval.probes": ["linear", "knn"], "eval.linear_epochs": [2],
              "eval.linear_weight_decays": [0.0], "eval.knn_k": [3], "eval.knn_temperature": [0.07],
              "eval.batch_size": 8}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One small dataset per kind of recipe: JPEG at rest of various sizes (ImageNet-100), raw 64x64 (Tiny
    ImageNet) and the STL-10 source's own splits from generated binary files (96x96, train+unlabeled)."""
    root = tmp_path_factory.mktemp("large")
    jpeg = prepare(root / "jpeg", jpeg_records(16, 0, 60, 120), jpeg_records(8, 1, 60, 120))
    rng = np.random.default_rng(0)

    def split(n):
        return SplitArrays(rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), np.arange(n) % 3)

    tiny = write_prepared(SourceData("tiny", {"train": split(16), "test": split(8)}, ["a", "b", "c"], "generated",
                                     {"seed": 0}), root / "tiny")
    make_stl10(root / "stl10_src", n_train=12, n_test=8, n_unlabeled=12)
    stl10 = write_prepared(load_source("stl10", root / "stl10_src", download=False), root / "stl10")
    return {"imagenet100": jpeg, "tiny_imagenet": tiny, "stl10": stl10}


def _dataset_for(recipe: str, datasets) -> str:
    return str(next(path for kind, path in datasets.items() if kind in recipe))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_one_epoch_and_evaluates(tmp_path, datasets, recipe):
    shipped = load_config(recipe)
    method = shipped.method["name"]
    config = load_config(recipe, [*SHRINK, *HEADS[method], f"data.root={_dataset_for(recipe, datasets)}",
                                  f"train.out={tmp_path / 'runs'}"])
    result = train(config, progress_bar=False)
    split = open_split(config.data.root, config.data.train_split)
    assert result.steps == split.num_images // 4  # one epoch of 4-image steps
    assert math.isfinite(result.final_loss)
    overrides = dict(CHEAP_EVAL)
    if "stl10" in recipe:  # train+unlabeled has no labels: the probes learn on `train`
        assert config.data.train_split == "train+unlabeled" and not config.train.online_probe
        overrides["data.train_split"] = "train"
    report = evaluate_run(result.run_dir, overrides=overrides, log=lambda *a: None)
    assert set(report["results"]) == set(shipped.eval.features)
    for entry in report["results"].values():
        assert 0 <= entry["linear"]["test_acc"] <= 1 and 0 <= entry["knn"]["test_acc"] <= 1
    assert json.loads((result.run_dir / "eval.json").read_text())["results"].keys() == report["results"].keys()


def test_new_recipes_load_with_their_sources(capsys):
    for recipe in RECIPES:
        config = load_config(recipe)
        assert config.model.arch == "resnet18"
    emp = load_config("emp_ssl/imagenet100_1epoch")
    (spec,) = emp.view_specs
    assert (emp.model.stem, emp.data.batch_size, emp.data.image_size, emp.optim.lr) == ("imagenet", 100, 224, 0.3)
    assert (spec.count, spec.size, spec.crop_scale, spec.interpolation) == (20, 224, (0.25, 0.25), "bicubic")
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5) and spec.hue == 0.2
    assert emp.method["invariance_weight"] == 200.0 and emp.method["eps"] == 0.2
    assert list(emp.eval.features) == ["bag", "full"] and emp.eval.bag_patches == 128
    tiny = load_config("emp_ssl/tiny_imagenet_1epoch")
    assert tiny.model.stem == "cifar" and tiny.view_specs[0].size == 32
    for recipe in ("byol/imagenet100", "vicreg/imagenet100"):
        first, second = load_config(recipe).view_specs
        assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
        assert first.crop_scale == (0.08, 1.0) and first.size == 224
    for recipe in ("simclr/stl10", "emp_ssl/stl10_1epoch"):
        config = load_config(recipe)
        assert config.data.train_split == "train+unlabeled" and config.train.online_probe is False
        assert config.view_specs[0].size == 96
    assert main(["recipes"]) == 0
    listed = {line.split("`")[1] for line in capsys.readouterr().out.splitlines() if line.startswith("| `")}
    assert set(RECIPES) <= listed


# --------------------------------------------------------------------------------------------------
# onepoch views on JPEG at rest
# --------------------------------------------------------------------------------------------------


def test_views_of_an_encoded_dataset_are_the_training_views(tmp_path, capsys, datasets):
    png = tmp_path / "v.png"
    assert main(["views", str(datasets["imagenet100"]), "--out", str(png), "--images", "3", "--views", "2",
                 "size=32"]) == 0
    out = capsys.readouterr().out
    assert "3 images x 2 views of 32x32 (recipe emp_ssl/imagenet100_1epoch, size=32; JPEG at rest" in out
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.size[0] == 2 * (3 * (32 + 2) + 2)  # the image + 2 views of 32 px, 2 px gaps, zoom 2
    # a recipe with two view groups (BYOL's asymmetric views): one column per group's view
    assert main(["views", str(datasets["imagenet100"]), "--recipe", "byol/imagenet100", "--out", str(png),
                 "--images", "2", "size=32"]) == 0
    assert "2 images x 2 views of 32x32 (recipe byol/imagenet100" in capsys.readouterr().out
    assert main(["views", str(datasets["imagenet100"]), "--spec", "emp_ssl_cifar", "--recipe", "byol/imagenet100",
                 "--out", str(png)]) == 2
    assert "give --spec or --recipe, not both" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Splits without labels
# --------------------------------------------------------------------------------------------------


def test_unlabeled_splits_are_marked_in_meta_json(tmp_path, datasets):
    stl10 = datasets["stl10"]
    assert open_split(stl10, "train+unlabeled").meta["labelled"] is False
    assert "labelled" not in open_split(stl10, "train").meta and "labelled" not in open_split(stl10, "test").meta
    rng = np.random.default_rng(0)
    raw = SourceData("r", {"train": SplitArrays(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.zeros(4, int)),
                           "test": SplitArrays(rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), np.zeros(2, int))},
                     ["a"], "generated", {}, unlabeled_splits=("train",))
    raw_root = write_prepared(raw, tmp_path / "raw")
    records = jpeg_records(3, 0)
    encoded = SourceData("e", {"train": EncodedSource(3, lambda: iter(records)),
                               "test": EncodedSource(3, lambda: iter(records))},
                         ["a", "b", "c"], "generated", {}, unlabeled_splits=("train",))
    encoded_root = write_prepared(encoded, tmp_path / "encoded")
    for root in (raw_root, encoded_root):
        assert json.loads((root / "train" / "meta.json").read_text())["labelled"] is False
        assert "labelled" not in json.loads((root / "test" / "meta.json").read_text())


def test_training_an_unlabeled_split_with_the_online_probe_is_refused(tmp_path, datasets):
    config = load_config("emp_ssl/stl10_1epoch", [*SHRINK, *HEADS["emp_ssl"], f"data.root={datasets['stl10']}",
                                                  f"train.out={tmp_path / 'runs'}", "train.online_probe=true"])
    with pytest.raises(ConfigError, match=r"train\+unlabeled split of .* has no labels .*"
                                          r"set train.online_probe=false") as e:
        train(config, progress_bar=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_evaluating_on_an_unlabeled_split_is_refused(tmp_path, datasets):
    from onepoch.run import open_eval_splits

    config = load_config("emp_ssl/stl10_1epoch", [f"data.root={datasets['stl10']}"])
    with pytest.raises(ConfigError, match=r"split 'train\+unlabeled' .* has no real labels.*data.train_split=train"):
        open_eval_splits(config)
    train_split, _ = open_eval_splits(load_config("emp_ssl/stl10_1epoch", [f"data.root={datasets['stl10']}",
                                                                          "data.train_split=train"]))
    assert train_split.split == "train"


def test_run_report_view_tiles_of_jpeg_at_rest_are_the_training_views(datasets):
    """`onepoch report` / TensorBoard view tiles of an encoded split: the views cut from the stored
    photographs as training cuts them (the same pixels as onepoch.views.encoded), not from the
    evaluation-size images."""
    from onepoch.views.encoded import first_images_views
    from onepoch.views.tiles import run_view_tiles
    from onepoch.run import view_specs_for
    from onepoch.views import load_view_spec

    config = load_config("byol/imagenet100", [f"data.root={datasets['imagenet100']}", "views.size=32"])
    split = open_split(datasets["imagenet100"], "train", image_size=32)
    tiles, titles = run_view_tiles(config, split, images=3, views_per_group=2)
    assert titles == ["image", "group 1\nview 1", "group 2\nview 1"]          # BYOL: one view per group
    specs = [load_view_spec(s, {"count": 1, "mean": None, "std": None})
             for s in view_specs_for(config, split.mean, split.std)]
    expected = first_images_views(split.images, 3, specs, config.seed)
    for g in range(2):
        assert np.allclose(tiles[:, 1 + g], expected[g][0].permute(0, 2, 3, 1).clamp(0, 1).numpy(), atol=1e-6)
    # not cut from the 32x32 evaluation images (those views would match these only by chance)
    from onepoch.views import make_views

    from_eval = make_views(torch.from_numpy(np.array(split.images[:3])), specs[0], torch.Generator().manual_seed(0))
    assert not np.allclose(tiles[:, 1], from_eval.permute(0, 2, 3, 1).clamp(0, 1).numpy(), atol=1e-2)
