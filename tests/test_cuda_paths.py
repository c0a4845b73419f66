"""The GPU paths that only a GPU runs: a CUDA run's RNG state across a resume, synchronised BatchNorm
under NCCL, ``train.compile``, the packed non-blocking copy of the view plans and the nvJPEG decoder in
training. Marked ``cuda`` (skipped without a CUDA device; ``benchmarks/gpu_check.sh`` step (a) runs
them), with the CPU side of each tested here where it can run on a CPU."""

from __future__ import annotations

import json

import pytest
import torch
from test_methods import TINY_HEADS
from test_train import make_blobs

import onepoch.train
from onepoch.checkpoints import checkpoint_paths, load_checkpoint
from onepoch.runconfig import load_config
from onepoch.train import train

SMALL = ["model.arch=resnet10", "model.width=0.125", "data.batch_size=8", "views.size=12", "views.count=4",
         "views.preset=emp_ssl_fashion_mnist", "train.threads=1", *TINY_HEADS["emp_ssl"]]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return make_blobs(tmp_path_factory.mktemp("blobs") / "blobs", n_train=32, n_test=16)


def config(tmp_path, blobs, *extra):
    return load_config(None, [*SMALL, f"data.root={blobs}", f"train.out={tmp_path}", *extra])


def restored_rng(monkeypatch, device: str) -> list:
    """Record the RNG state (torch's, or CUDA's) right after each ``_restore``."""
    real, seen = onepoch.train._restore, []

    def spy(run):
        step = real(run)
        seen.append(torch.cuda.get_rng_state(run.device) if device == "cuda" else torch.get_rng_state())
        return step

    monkeypatch.setattr(onepoch.train, "_restore", spy)
    return seen


def test_a_resume_restores_torchs_rng_state_and_a_cpu_checkpoint_holds_no_cuda_state(tmp_path, blobs, monkeypatch):
    """The CPU side of the CUDA test below: the state saved is the one a resume starts from."""
    train(config(tmp_path, blobs, "name=r", "train.max_steps=3", "train.checkpoint_every=3"), progress_bar=False)
    saved = load_checkpoint(checkpoint_paths(tmp_path / "r")[-1])["rng"]
    assert saved["cuda"] is None
    seen = restored_rng(monkeypatch, "cpu")
    torch.manual_seed(12345)                                     # whatever the process's state was
    train(config(tmp_path, blobs, "name=r", "train.max_steps=4", "train.checkpoint_every=3"), resume=True,
          progress_bar=False)
    assert len(seen) == 1 and torch.equal(seen[0], saved["torch"])


@pytest.mark.cuda
def test_a_cuda_run_resumes_with_its_cuda_rng_state(tmp_path, blobs, monkeypatch):
    """A CUDA run's checkpoint holds the CUDA RNG state and a resume restores it; the resumed run ends
    equivalent to an uninterrupted one (CUDA kernels are not bit-deterministic: 1e-2 relative)."""
    common = ["train.device=cuda", "train.amp=off", "train.checkpoint_every=3", "train.max_steps=6"]
    whole = train(config(tmp_path, blobs, *common, "name=whole"), progress_bar=False)
    train(config(tmp_path, blobs, *common, "name=part", "train.max_steps=3"), progress_bar=False)
    saved = load_checkpoint(checkpoint_paths(tmp_path / "part")[-1])["rng"]
    assert isinstance(saved["cuda"], torch.Tensor) and saved["cuda"].dtype == torch.uint8
    seen = restored_rng(monkeypatch, "cuda")
    torch.cuda.manual_seed(12345)
    resumed = train(config(tmp_path, blobs, *common, "name=part"), resume=True, progress_bar=False)
    assert len(seen) == 1 and torch.equal(seen[0].cpu(), saved["cuda"].cpu())
    assert resumed.steps == whole.steps == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    a, b = (torch.cat([p.detach().float().flatten().cpu() for p in r.model.parameters()]) for r in (whole, resumed))
    assert (a - b).norm() / a.norm() < 1e-2


@pytest.mark.cuda
def test_sync_batchnorm_under_a_one_process_nccl_group_is_batchnorm(tmp_path):
    """convert_sync_batchnorm on CUDA gives torch's SyncBatchNorm, which under NCCL (one process, the
    one-GPU case) computes what BatchNorm computes: outputs, gradients and running statistics."""
    import copy

    import torch.distributed as dist

    from onepoch.distributed import convert_sync_batchnorm, stop
    from onepoch.models import build_backbone

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = build_backbone("resnet10", stem="cifar", width=0.125, in_chans=3).cuda().train()
        synced = convert_sync_batchnorm(copy.deepcopy(plain), "cuda")
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        x = torch.randn(16, 3, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        out_plain, out_synced = plain(x), synced(x)
        torch.testing.assert_close(out_synced, out_plain, rtol=1e-4, atol=1e-5)
        out_plain.square().mean().backward()
        out_synced.square().mean().backward()
        for (name, p), q in zip(plain.named_parameters(), synced.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)
        for (name, b), c in zip(plain.named_buffers(), synced.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        stop()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_with_nccl_train_what_one_gpu_trains(tmp_path, blobs):
    """torchrun on 2 GPUs (NCCL, SyncBatchNorm) against 1 GPU with the same global batch: the weights
    and BatchNorm's running statistics agree to 1e-2 (relative; float32, amp off)."""
    import os
    import subprocess
    import sys

    common = [*SMALL, f"data.root={blobs}", f"train.out={tmp_path}", "train.device=cuda", "train.amp=off",
              "train.max_steps=3"]
    train(load_config(None, [*common, "name=one"]), progress_bar=False)
    proc = subprocess.run([sys.executable, "-m", "onepoch", "train", "emp_ssl/fashion_mnist_demo", *common, "name=two",
                           "train.backend=nccl", "--nproc", "2"], env={**os.environ, "ONEPOCH_PROGRESS": "0"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (load_checkpoint(checkpoint_paths(tmp_path / name)[-1])["model"] for name in ("one", "two"))
    for kind, pick in (("weights", lambda k: "running_" not in k), ("running statistics", lambda k: "running_" in k)):
        a = torch.cat([v.double().flatten() for k, v in one.items() if v.is_floating_point() and pick(k)])
        b = torch.cat([v.double().flatten() for k, v in two.items() if v.is_floating_point() and pick(k)])
        assert (a - b).norm() / a.norm() < 1e-2, kind


@pytest.mark.cuda
def test_train_compile_on_cuda_trains_like_the_eager_network(tmp_path, blobs):
    """train.compile=true on CUDA: the first step's loss is the eager one's (1e-3 relative: other kernels),
    and 3 steps give finite weights."""
    common = ["train.device=cuda", "train.amp=off", "train.max_steps=3", "train.log_every=1"]
    eager = train(config(tmp_path, blobs, *common, "name=eager"), progress_bar=False)
    compiled = train(config(tmp_path, blobs, *common, "name=compiled", "train.compile=true"), progress_bar=False)
    first = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0])["loss"]
             for n in ("eager", "compiled")]
    assert abs(first[1] - first[0]) <= 1e-3 * abs(first[0]), first
    assert compiled.steps == eager.steps == 3
    assert all(torch.isfinite(p).all() for p in compiled.model.parameters())


@pytest.mark.cuda
def test_the_packed_non_blocking_plan_copy_equals_blocking_copies_while_the_device_is_busy():
    """_Plan.to packs the plan's tensors into one pinned buffer per dtype and copies it without blocking.
    Queued behind a long matrix product, over many calls (pinned buffers reused by the allocator), every
    field on the device must equal a plain blocking copy of it."""
    from onepoch.views import ViewSpec
    from onepoch.views.params import sample_view_params
    from onepoch.views.render import _make_plan

    spec = ViewSpec(count=8, size=16, blur_p=0.5, solarize_p=0.5, grayscale_p=0.5)
    cuda = torch.device("cuda")
    big = torch.randn(4096, 4096, device=cuda)
    for seed in range(20):
        params = sample_view_params(spec, 32, 24, 24, torch.Generator().manual_seed(seed))
        plan = _make_plan(params, spec, 32, 24, 1.0)
        big = big @ big / 64                                      # keeps the stream busy
        moved = plan.to(cuda)
        for name, value in vars(plan).items():
            if value is None:
                assert getattr(moved, name) is None
                continue
            expected = value.to(cuda)                             # blocking: after the queued work
            got = getattr(moved, name)
            assert got.device.type == "cuda" and got.shape == value.shape and torch.equal(got, expected), name
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_training_on_jpeg_at_rest_on_cuda_decodes_on_the_side_stream_and_resumes(tmp_path):
    """A JPEG-at-rest run on CUDA (nvJPEG where torchvision offers it, decoding the next call's images on
    its side stream while the step runs): finite weights, and a run stopped at 3 and resumed ends
    equivalent to one of 6 steps (1e-2 relative)."""
    from test_encoded import jpeg_records, prepare

    root = prepare(tmp_path / "ds", jpeg_records(24, 0, 40, 90), jpeg_records(6, 1))
    common = ["model.arch=resnet10", "model.width=0.0625", "method.pre_feature=32", "method.projector=32-16",
              "views.count=3", "views.size=16", "data.batch_size=4", "train.checkpoint_every=3",
              "train.online_probe=false", "train.device=cuda", "train.amp=off", "train.view_steps=2",
              f"data.root={root}", f"train.out={tmp_path / 'runs'}", "train.max_steps=6"]
    whole = train(load_config("emp_ssl/imagenet100_1epoch", [*common, "name=whole"]), progress_bar=False)
    train(load_config("emp_ssl/imagenet100_1epoch", [*common, "name=parts", "train.max_steps=3"]), progress_bar=False)
    parts = train(load_config("emp_ssl/imagenet100_1epoch", [*common, "name=parts"]), resume=True, progress_bar=False)
    a, b = (torch.cat([p.detach().float().flatten().cpu() for p in r.model.parameters()]) for r in (whole, parts))
    assert torch.isfinite(a).all() and (a - b).norm() / a.norm() < 1e-2
