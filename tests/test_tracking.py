"""TensorBoard logging (onepoch.tracking), read back with TensorBoard's own reader."""

import json
import sys

import numpy as np
import pytest
from test_train import blobs, tiny_config  # noqa: F401  (fixture)

from onepoch.data import open_split
from onepoch.errors import ConfigError
from onepoch.plots import tile_mosaic
from onepoch.runconfig import load_config
from onepoch.tracking import Tracker, flat_hparams, scalar_tag
from onepoch.train import train
from onepoch.views.tiles import run_view_tiles


def read_events(run_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_tags_and_flat_hparams():
    assert [scalar_tag(k) for k in ("step", "epoch", "time", "loss", "tcr", "lr", "patches_per_s",
                                    "online_probe_acc")] == [None, None, None, "loss/loss", "loss/tcr", "train/lr",
                                                             "train/patches_per_s", "online_probe/acc"]
    assert flat_hparams({"seed": 0, "optim": {"lr": 0.3, "name": "lars"}, "eval": {"probes": ["knn"]},
                         "data": {"limit": None}}) == {"seed": 0, "optim.lr": 0.3, "optim.name": "lars",
                                                        "eval.probes": "['knn']", "data.limit": "None"}


def test_log_to_is_checked():
    assert load_config(None, ["train.log_to=tensorboard"]).train.log_to == ("jsonl", "tensorboard")
    assert load_config(None, []).train.log_to == ("jsonl",)
    with pytest.raises(ConfigError, match=r"unknown train.log_to entry 'tensorbord' \(did you mean 'tensorboard'"):
        load_config(None, ["train.log_to=[jsonl, tensorbord]"])


def test_a_short_run_logged_to_tensorboard_reads_back(tmp_path, blobs):  # noqa: F811
    config = tiny_config(tmp_path, blobs, "train.max_steps=4", "train.log_every=1")
    train(config, progress_bar=False)
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    tiles, _ = run_view_tiles(config, open_split(blobs, "train"))
    results = {"full": {"dim": 32, "linear": {"test_acc": 0.75, "val_acc": 0.7}, "knn": {"test_acc": 0.5}}}
    # the calls of a run with train.log_to=[jsonl,tensorboard]: the views at step 0, every metrics
    # record, then the evaluation's results
    with Tracker(config.run_dir, ("jsonl", "tensorboard")) as tracker:
        tracker.log_views(0, tiles)
        for row in rows:
            tracker.log_scalars(row["step"], row)
        tracker.log_hparams(config, results)

    events = read_events(config.run_dir)
    tags = events.Tags()
    parts = [k for k in rows[0] if k not in ("step", "epoch", "time", "lr", "patches_per_s")]
    assert {"loss/loss", "loss/tcr", "loss/invariance", "train/lr", "train/patches_per_s", "online_probe/acc",
            "online_probe/loss"} <= set(tags["scalars"])
    for key in parts + ["lr", "patches_per_s"]:
        logged = [(e.step, e.value) for e in events.Scalars(scalar_tag(key))]
        assert [s for s, _ in logged] == [1, 2, 3, 4]
        assert np.allclose([v for _, v in logged], [r[key] for r in rows], rtol=1e-6)
    (image,) = events.Images("views")
    assert image.step == 0 and (image.height, image.width) == tile_mosaic(tiles).shape[:2]
    assert [e.value for e in events.Scalars("eval/full/linear")] == [0.75]
    assert [e.value for e in events.Scalars("eval/full/knn")] == [0.5]
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["optim.lr"].number_value == pytest.approx(config.optim.lr)
    assert hparams["method.name"].string_value == "emp_ssl" and hparams["model.arch"].string_value == "resnet10"


def test_nothing_is_written_before_the_first_log_call(tmp_path):
    tracker = Tracker(tmp_path / "run", ("jsonl", "tensorboard"))
    assert not (tmp_path / "run").exists()                     # a trainer may check log_to before its run dir
    tracker.log_scalars(1, {"loss": 2.0})
    tracker.close()
    assert [e.value for e in read_events(tmp_path / "run").Scalars("loss/loss")] == [2.0]


def test_a_resumed_run_replaces_the_events_after_its_checkpoint(tmp_path):
    with Tracker(tmp_path, ["tensorboard"]) as tracker:
        for step in range(1, 7):
            tracker.log_scalars(step, {"step": step, "loss": float(step)})
    with Tracker(tmp_path, ["tensorboard"], start_step=4) as tracker:   # killed after 6, resumed from step 4
        for step in range(5, 8):
            tracker.log_scalars(step, {"step": step, "loss": 100.0 + step})
    assert [(e.step, e.value) for e in read_events(tmp_path).Scalars("loss/loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0)]


def test_without_tensorboard_installed(tmp_path, blobs, monkeypatch):  # noqa: F811
    for module in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)          # `import tensorboard` now fails
    config = tiny_config(tmp_path, blobs, "train.max_steps=2")
    train(config, progress_bar=False)                           # log_to: [jsonl], the default
    with Tracker(config.run_dir, config.train.log_to) as tracker:
        tracker.log_scalars(1, {"loss": 1.0})
        tracker.log_views(0, np.zeros((1, 2, 4, 4, 1)))
        tracker.log_hparams(config, {})
    assert not (config.run_dir / "tensorboard").exists()
    with pytest.raises(ConfigError, match=r"train.log_to asks for tensorboard, which is not installed: "
                                          r"pip install \"onepoch\[tensorboard\]\""):
        Tracker(config.run_dir, ("jsonl", "tensorboard"))
