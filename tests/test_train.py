"""The trainer: config checks, checkpoints, in-process resume, NaN guard (SIGKILL resume: test_reliability.py)."""

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from onepoch.checkpoints import checkpoint_paths, load_checkpoint
from onepoch.data import SourceData, SplitArrays, write_prepared
from onepoch.errors import ConfigError
from onepoch.runconfig import load_config
from onepoch.train import TrainingError, train

TINY = ["model.arch=resnet10", "model.width=0.0625", "method.pre_feature=32", "method.projector=32-16",
        "views.preset=emp_ssl_fashion_mnist", "views.count=4", "views.size=8", "data.batch_size=8",
        "train.checkpoint_every=3", "train.threads=1", "eval.bag_patches=2", "eval.linear_epochs=[2]",
        "eval.linear_weight_decays=[0.0]"]


def make_blobs(root: Path, n_train=64, n_test=32, size=12, seed=0) -> Path:
    """A generated 1-channel dataset: class c is a bright square at one of 4 places."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 60, (n, size, size, 1)).astype(np.uint8)
        for i, c in enumerate(labels):
            y, x = divmod(int(c), 2)
            images[i, y * 6:y * 6 + 6, x * 6:x * 6 + 6] = 220
        return SplitArrays(images, labels)

    data = SourceData("blobs", {"train": split(n_train), "test": split(n_test)}, ["a", "b", "c", "d"],
                      "generated", {"name": "blobs", "seed": seed})
    return write_prepared(data, root)


@pytest.fixture
def blobs(tmp_path):
    return make_blobs(tmp_path / "blobs")


def tiny_config(tmp_path, data_root, *extra):
    return load_config(None, [*TINY, f"data.root={data_root}", f"train.out={tmp_path / 'runs'}", "name=t", *extra])


def test_config_errors_name_the_key(tmp_path, blobs):
    with pytest.raises(ConfigError, match="unknown optim key 'lrr' .*did you mean 'lr'"):
        tiny_config(tmp_path, blobs, "optim.lrr=0.1")
    with pytest.raises(ConfigError, match="unknown config key 'trian.epochs'.*did you mean 'train'"):
        tiny_config(tmp_path, blobs, "trian.epochs=2")
    with pytest.raises(ConfigError, match="unknown method key 'epss'"):
        tiny_config(tmp_path, blobs, "method.epss=0.1")
    with pytest.raises(ConfigError, match="unknown method 'emp_sl'.*did you mean 'emp_ssl'"):
        tiny_config(tmp_path, blobs, "method.name=emp_sl")
    with pytest.raises(ConfigError, match="count"):
        tiny_config(tmp_path, blobs, "views.count=0")
    with pytest.raises(ConfigError, match="optim.lr must be a finite number > 0"):
        tiny_config(tmp_path, blobs, "optim.lr=-1")
    with pytest.raises(ConfigError, match="train.epochs: expected a number"):
        tiny_config(tmp_path, blobs, "train.epochs=one")
    with pytest.raises(ConfigError, match="recipe 'emp_ssl/cifar10_1epok' not found.*did you mean"):
        load_config("emp_ssl/cifar10_1epok")


def test_shipped_recipes_load():
    for name in ("emp_ssl/cifar10_1epoch", "emp_ssl/cifar100_1epoch", "emp_ssl/fashion_mnist_demo"):
        config = load_config(name)
        assert config.method["name"] == "emp_ssl"
    paper = load_config("emp_ssl/cifar10_1epoch")
    assert (paper.views["count"], paper.data.batch_size, paper.optim.lr) == (20, 100, 0.3)
    assert (paper.method["eps"], paper.method["invariance_weight"]) == (0.2, 200.0)
    assert (paper.method["pre_feature"], paper.method["projector"]) == ("4096", "4096-1024")


def test_train_writes_run_dir_and_resume_continues_exactly(tmp_path, blobs):
    config = tiny_config(tmp_path, blobs, "train.epochs=2")
    full = train(config, progress_bar=False)
    assert full.steps == 16  # 64 images / 8 per step x 2 epochs
    run = config.run_dir
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 17))
    assert {"loss", "invariance", "tcr", "lr", "patches_per_s", "online_probe_acc", "online_probe_loss"} <= set(lines[0])
    online = json.loads((run / "online_probe.json").read_text())
    assert online["step"] == 16 and online["test_acc"] == full.online_probe_test_acc
    # one view per image of the 32 test images (its value is near chance here: the crops lose the
    # blobs' position, which is their class)
    assert online["split"] == "test" and online["test_acc"] * 32 == round(online["test_acc"] * 32)
    assert [p.name for p in checkpoint_paths(run)] == ["step_0000015.pt", "step_0000016.pt"]  # keep 2
    final_state = load_checkpoint(checkpoint_paths(run)[-1])
    final = final_state["model"]

    # The same run stopped after 5 steps (checkpoint at 3 and 5), then resumed: identical weights.
    config2 = tiny_config(tmp_path, blobs, "train.epochs=2", "name=t2", "eval.knn_k=7")  # eval keys may differ
    part = train(load_config(None, [*TINY, f"data.root={blobs}", f"train.out={tmp_path / 'runs'}", "name=t2",
                                    "train.epochs=2", "train.max_steps=5"]), progress_bar=False)
    assert part.steps == 5
    resumed = train(config2, resume=True, progress_bar=False)
    assert resumed.steps == 16
    again_state = load_checkpoint(checkpoint_paths(config2.run_dir)[-1])
    again = again_state["model"]
    for key in final:
        assert torch.equal(final[key], again[key]), key
    for key in final_state["probe"]:  # the online probe resumes exactly too
        assert torch.equal(final_state["probe"][key], again_state["probe"][key]), key
    assert resumed.online_probe_test_acc == full.online_probe_test_acc
    steps = [json.loads(x)["step"] for x in (config2.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))


def test_fractional_epochs_run_their_share_of_steps(tmp_path, blobs):
    config = tiny_config(tmp_path, blobs, "train.epochs=1.5")   # 8 steps per epoch
    result = train(config, progress_bar=False)
    assert result.steps == 12 and load_checkpoint(checkpoint_paths(config.run_dir)[-1])["total_steps"] == 12
    assert tiny_config(tmp_path, blobs, "train.epochs=2.0").train.epochs == 2   # whole numbers stay integers
    with pytest.raises(ConfigError, match="train.epochs must be > 0"):
        tiny_config(tmp_path, blobs, "train.epochs=0")


def test_online_probe_learns_the_labels(tmp_path, blobs):
    """Views that show the whole image: the class (where the bright square is) is learnable."""
    config = tiny_config(tmp_path, blobs, "views.crop_scale=[1.0,1.0]", "views.flip_p=0.0", "train.epochs=6",
                         "train.online_probe_lr=0.01")
    result = train(config, progress_bar=False)
    assert result.online_probe_test_acc > 0.6  # 4 classes: chance is 0.25
    off = train(tiny_config(tmp_path, blobs, "name=noprobe", "train.online_probe=false", "train.max_steps=8"),
                progress_bar=False)
    assert off.online_probe_test_acc is None and not (off.run_dir / "online_probe.json").exists()
    assert "online_probe_acc" not in (off.run_dir / "metrics.jsonl").read_text()


def test_run_dir_guards(tmp_path, blobs):
    config = tiny_config(tmp_path, blobs, "train.max_steps=2")
    train(config, progress_bar=False)
    with pytest.raises(TrainingError, match="already exists; pass --resume"):
        train(config, progress_bar=False)
    other = tiny_config(tmp_path, blobs, "train.max_steps=2", "optim.lr=0.1")
    with pytest.raises(TrainingError, match=r"config differs in optim.lr"):
        train(other, resume=True, progress_bar=False)
    with pytest.raises(TrainingError, match="no run"):
        train(tiny_config(tmp_path, blobs, "name=absent"), resume=True, progress_bar=False)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, blobs, monkeypatch):
    import onepoch.methods.emp_ssl as emp

    real = emp.emp_ssl_loss
    calls = {"n": 0}

    def flaky(z, **kw):
        loss, parts = real(z, **kw)
        calls["n"] += 1
        if calls["n"] == 5:
            return loss * float("nan"), {**parts, "tcr": parts["tcr"] * float("nan")}
        return loss, parts

    monkeypatch.setattr(emp, "emp_ssl_loss", flaky)
    config = tiny_config(tmp_path, blobs)
    with pytest.raises(TrainingError, match=r"loss is nan at step 5 \(invariance=.*tcr=nan\)"):
        train(config, progress_bar=False)
    assert [p.name for p in checkpoint_paths(config.run_dir)] == ["step_0000003.pt"]
    assert load_checkpoint(checkpoint_paths(config.run_dir)[0])["step"] == 3


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": {}, "payload": _Exploit()}, path)
    with pytest.raises(ConfigError, match="cannot be loaded safely"):
        load_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2]) + b"garbage")
    with pytest.raises(ConfigError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_checkpoint_of_another_architecture_is_refused(tmp_path, blobs):
    config = tiny_config(tmp_path, blobs, "train.max_steps=3")
    train(config, progress_bar=False)
    path = checkpoint_paths(config.run_dir)[-1]
    state = load_checkpoint(path)
    state["model"] = {k: v[:1] if v.ndim else v for k, v in state["model"].items()}
    torch.save(state, path)
    with pytest.raises(ConfigError, match="does not fit this model"):
        train(tiny_config(tmp_path, blobs, "train.max_steps=6"), resume=True, progress_bar=False)


def test_train_logs_to_tensorboard(tmp_path, blobs):
    """The TensorBoard events hold the same scalars as metrics.jsonl, step by step, and the views grid."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tmp_path, blobs, "train.max_steps=4", "train.log_every=2", "train.log_to=[jsonl,tensorboard]")
    train(config, progress_bar=False)
    events = EventAccumulator(str(config.run_dir / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("loss/loss")] == [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("loss/loss")] == pytest.approx([r["loss"] for r in rows])
    assert events.Images("views")[0].step == 0


def test_a_bad_config_writes_nothing_and_the_corrected_command_runs(tmp_path, blobs):
    """An unknown architecture (or any config error) stops the run before its directory exists."""
    with pytest.raises(ConfigError, match="unknown model.arch 'resnet99'"):
        train(tiny_config(tmp_path, blobs, "model.arch=resnet99"), progress_bar=False)
    assert not (tmp_path / "runs" / "t").exists()
    with pytest.raises(ConfigError, match="data.batch_size 1000 is larger"):
        train(tiny_config(tmp_path, blobs, "data.batch_size=1000"), progress_bar=False)
    assert not (tmp_path / "runs" / "t").exists()
    assert train(tiny_config(tmp_path, blobs, "train.max_steps=2"), progress_bar=False).steps == 2


def test_resume_auto_starts_then_continues(tmp_path, blobs):
    # a run killed before its first checkpoint (config.yaml and metrics only) starts again from step 0
    (tmp_path / "runs" / "t").mkdir(parents=True)
    config = tiny_config(tmp_path, blobs, "train.max_steps=3", "train.resume=auto")
    (tmp_path / "runs" / "t" / "config.yaml").write_text(__import__("yaml").safe_dump(config.to_dict()))
    (tmp_path / "runs" / "t" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.0}\n{"step": 2, "lo')
    first = train(tiny_config(tmp_path, blobs, "train.max_steps=3", "train.resume=auto"), progress_bar=False)
    lines = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[0]["loss"] != 0.0
    assert first.steps == 3
    again = train(tiny_config(tmp_path, blobs, "train.max_steps=5", "train.resume=auto"), progress_bar=False)
    assert again.steps == 5 and [p.name for p in checkpoint_paths(again.run_dir)] == ["step_0000003.pt",
                                                                                         "step_0000005.pt"]


def test_exponent_without_a_dot_is_a_number(tmp_path, blobs):
    """YAML 1.1 reads 1e-4 as a string; a float key takes it as the number it spells."""
    config = tiny_config(tmp_path, blobs, "optim.weight_decay=1e-4", "eval.linear_weight_decays=[0,1e-4]")
    assert config.optim.weight_decay == 1e-4 and config.eval.linear_weight_decays == (0.0, 1e-4)
    with pytest.raises(ConfigError, match="optim.weight_decay: expected a number, got 'lots'"):
        tiny_config(tmp_path, blobs, "optim.weight_decay=lots")


def test_schedule_epochs_follow_torchs_cosine_annealing_over_the_longer_span(tmp_path, blobs):
    """optim.schedule_epochs: the official EMP-SSL run anneals with CosineAnnealingLR(T_max = 30 epochs of
    steps, eta_min=0), stepped once per step, and its one-epoch result is the checkpoint after epoch 1. The
    learning rates of a one-epoch run with a 3-epoch schedule equal torch's for those steps; without
    schedule_epochs the schedule ends with the run."""
    config = tiny_config(tmp_path, blobs, "optim.schedule_epochs=3", "optim.lr=0.3", "train.log_every=1")
    train(config, progress_bar=False)
    lrs = [json.loads(line)["lr"] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = len(lrs)  # one epoch: 64 images / 8 per step
    assert steps == 8
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3 * steps, eta_min=0)
    expected = []
    for _ in range(steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert lrs[-1] > 0.2  # 7 of 24 steps down the cosine, not annealed to zero
    whole = tiny_config(tmp_path, blobs, "optim.lr=0.3", "train.log_every=1", "name=whole")
    train(whole, progress_bar=False)
    last = json.loads((whole.run_dir / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
    assert last == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_a_misspelt_recipe_gets_the_suggestion_not_every_recipe():
    """Issue 29: after the good suggestion, the message listed all the shipped recipes (50 names)."""
    with pytest.raises(ConfigError) as info:
        load_config("emp_ssl/cifar10_1epok")
    assert str(info.value) == ("recipe 'emp_ssl/cifar10_1epok' not found: not a file, nor a shipped recipe "
                               "(did you mean 'emp_ssl/cifar10_1epoch'?)")
    with pytest.raises(ConfigError) as info:                 # nothing close: the recipes of that method
        load_config("swav/nothing_like_it")
    assert str(info.value) == ("recipe 'swav/nothing_like_it' not found: not a file, nor a shipped recipe; the "
                               "shipped swav recipes: swav/cifar10, swav/cifar100, swav/cifar100_cpu, "
                               "swav/cifar10_cpu, swav/fashion_mnist_1epoch, swav/fashion_mnist_multicrop")
    with pytest.raises(ConfigError) as info:                 # nothing at all: where to look
        load_config("zzz")
    assert str(info.value) == ("recipe 'zzz' not found: not a file, nor a shipped recipe; `onepoch recipes` "
                               "lists the shipped ones")
