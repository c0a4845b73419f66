"""The step loop runs ahead of the device: one host sync per log window, views rendered several
steps per call without changing them, and non-finite steps still caught and named."""

import json

import pytest
import torch
from test_train import make_blobs, tiny_config

import onepoch.methods.emp_ssl as emp
import onepoch.train
from onepoch.checkpoints import checkpoint_paths, load_checkpoint
from onepoch.train import TrainingError, train


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return make_blobs(tmp_path_factory.mktemp("blobs") / "blobs", n_train=48)  # 6 steps per epoch


@pytest.fixture
def syncs(monkeypatch):
    """Counts the calls of the one helper that moves values from the device to the host."""
    calls = []
    real = onepoch.train.fetch_to_host

    def counting(values):
        calls.append(values.numel())
        return real(values)

    monkeypatch.setattr(onepoch.train, "fetch_to_host", counting)
    return calls


@pytest.mark.parametrize("checkpoint_every, expected", [(100, 3), (4, 5)])
def test_host_syncs_only_at_log_and_checkpoint_steps(tmp_path, blobs, syncs, checkpoint_every, expected):
    """12 steps, log_every 5: syncs after steps 5, 10 and 12 (the end); checkpoints every 4 add 4 and 8."""
    config = tiny_config(tmp_path, blobs, "train.epochs=2", "train.log_every=5",
                         f"train.checkpoint_every={checkpoint_every}", "train.online_probe=false")
    train(config, progress_bar=False)
    assert len(syncs) == expected
    lines = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))  # still one metrics line per step
    assert all(torch.isfinite(torch.tensor([r["loss"], r["tcr"], r["patches_per_s"]])).all() for r in lines)


def test_nan_loss_between_syncs_is_named_at_its_step(tmp_path, blobs, monkeypatch, syncs):
    real, calls = emp.emp_ssl_loss, {"n": 0}

    def flaky(z, **kw):
        loss, parts = real(z, **kw)
        calls["n"] += 1
        if calls["n"] == 7:  # step 7 (as metrics.jsonl numbers it), in the middle of the window 6..10
            return loss * float("nan"), {**parts, "tcr": parts["tcr"] * float("nan")}
        return loss, parts

    monkeypatch.setattr(emp, "emp_ssl_loss", flaky)
    config = tiny_config(tmp_path, blobs, "train.epochs=2", "train.log_every=5", "train.checkpoint_every=5")
    with pytest.raises(TrainingError, match=r"loss is nan at step 7 \(invariance=.*tcr=nan\)"):
        train(config, progress_bar=False)
    assert [p.name for p in checkpoint_paths(config.run_dir)] == ["step_0000005.pt"]
    state = load_checkpoint(checkpoint_paths(config.run_dir)[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _weights(config):
    state = load_checkpoint(checkpoint_paths(config.run_dir)[-1])
    return state["model"]


def test_views_rendered_several_steps_per_call_are_the_same(tmp_path, blobs):
    """view_steps 1 and 4 (steps rendered per call, across an epoch boundary) train to the same
    weights; a run stopped after 5 steps and resumed with view_steps 4 too."""
    one = tiny_config(tmp_path, blobs, "train.epochs=2", "name=one", "train.view_steps=1")
    four = tiny_config(tmp_path, blobs, "train.epochs=2", "name=four", "train.view_steps=4")
    train(one, progress_bar=False)
    train(four, progress_bar=False)
    a, b = _weights(one), _weights(four)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    split = tiny_config(tmp_path, blobs, "train.epochs=2", "name=split", "train.view_steps=4", "train.max_steps=5")
    train(split, progress_bar=False)
    resumed = tiny_config(tmp_path, blobs, "train.epochs=2", "name=split", "train.view_steps=3")
    train(resumed, resume=True, progress_bar=False)
    c = _weights(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_each_rank_renders_its_rows_of_the_global_views():
    """The views of a 12-image global batch rendered by 1 process equal, image by image, those that
    3 ranks of 4 images render: view randomness does not depend on the number of processes."""
    from onepoch.views.stream import step_view_groups
    from onepoch.views import get_preset, load_view_spec

    images = torch.randint(0, 256, (2, 12, 16, 16, 3), dtype=torch.uint8)  # 2 steps
    specs = [load_view_spec(get_preset("emp_ssl_cifar"), {"count": 3, "size": 8, "blur_p": 0.5}),
             load_view_spec(get_preset("emp_ssl_cifar"), {"count": 2, "size": 6})]
    whole = step_view_groups(list(images), specs, seed=5, first_step=10, channels_last=False)
    for rank in range(3):
        mine = step_view_groups([b[4 * rank:4 * rank + 4] for b in images], specs, seed=5, first_step=10,
                                channels_last=False, rank=rank, world_size=3)
        for step in range(2):
            for g in range(2):
                assert torch.equal(mine[step][g], whole[step][g][:, 4 * rank:4 * rank + 4])
