"""Data-parallel training on the CPU with gloo: N processes train exactly what one process trains
with the same global batch, rank 0 writes, a killed rank is restarted by torchrun and resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_methods import TINY_HEADS
from test_train import make_blobs

from onepoch.checkpoints import checkpoint_paths, load_checkpoint
from onepoch.runconfig import load_config
from onepoch.train import train

HEADS = {**TINY_HEADS, "emp_ssl": ["method.pre_feature=32", "method.projector=32-16"]}
METHODS = list(dict.fromkeys(["emp_ssl", *TINY_HEADS]))
# 100 images, a global batch of 100: one step per epoch, 3 epochs = 3 optimizer steps
BASE = ["model.arch=resnet10", "model.width=0.125", "views.size=8", "data.batch_size=100", "train.epochs=3",
        "train.threads=1", "train.checkpoint_every=100", "train.log_every=1", "eval.batch_size=20"]
WORKER = Path(__file__).parent / "distributed_worker.py"


@pytest.fixture(scope="module")
def blobs100(tmp_path_factory):
    return make_blobs(tmp_path_factory.mktemp("blobs") / "blobs", n_train=100, n_test=20)


def recipe_of(name: str) -> tuple[str, list[str]]:
    if name == "emp_ssl":
        return "emp_ssl/fashion_mnist_demo", ["views.count=4", *HEADS[name]]
    return f"{name}/fashion_mnist_1epoch", HEADS[name]


def env() -> dict:
    return {**os.environ, "ONEPOCH_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc: int = 2, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", *args]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def parameters(state: dict) -> torch.Tensor:
    """Every trainable tensor of a state dict (not the BatchNorm running statistics), flattened."""
    return torch.cat([v.flatten().double() for k, v in state.items()
                      if v.is_floating_point() and "running_" not in k])


def running_statistics(state: dict) -> torch.Tensor:
    """BatchNorm's running means and variances of a state dict (what every evaluation uses), flattened."""
    return torch.cat([v.flatten().double() for k, v in state.items() if "running_" in k])


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path, blobs100):
    """For every method: 2 processes of 50 images each against 1 process of the 100-image global batch,
    BatchNorm synchronised. At the first step (identical weights) the loss agrees to 1e-5 (relative).
    After that float32 rounding differs (other reduction orders) and the network amplifies it; so the
    losses of steps 2-3 and the weights after 3 steps must agree to 1e-5 and 1e-4 (relative), or to 3x
    what a second 1-process run that only rounds differently (2 threads, NCHW layout) differs by; so
    must BatchNorm's running statistics, which every evaluation uses. Measured here: weights within
    4e-7..9e-5 (the noise run: 1e-5..1e-3); a missing gather or an unsynchronised BatchNorm is off by
    1e-2 or more."""
    jobs = []
    for name in METHODS:
        recipe, extra = recipe_of(name)
        common = [*BASE, *extra, f"data.root={blobs100}", f"train.out={tmp_path}"]
        train(load_config(recipe, [*common, f"name={name}_one"]), progress_bar=False)
        train(load_config(recipe, [*common, f"name={name}_noise", "train.threads=2", 'train.channels_last="off"']),
              progress_bar=False)
        jobs.append((recipe, [*common, f"name={name}_two"]))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(torchrun(str(WORKER), str(tmp_path / "jobs.json")), env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in METHODS:
        one, noise, two = (tmp_path / f"{name}_{kind}" for kind in ("one", "noise", "two"))
        ref, ddp, other = losses(one), losses(two), losses(noise)
        assert len(ddp) == len(ref) == 3
        assert abs(ddp[0] - ref[0]) <= 1e-5 * abs(ref[0]), (name, ddp, ref)
        for a, b, c in zip(ddp[1:], ref[1:], other[1:]):
            assert abs(a - b) <= max(1e-5 * abs(b), 3 * abs(c - b)), (name, ddp, ref, other)
        s_two, s_one, s_noise = (load_checkpoint(checkpoint_paths(r)[-1]) for r in (two, one, noise))
        assert s_two["step"] == s_one["step"] == 3
        for part in ("model", "probe"):
            for kind, tensors in (("weights", parameters), ("running statistics", running_statistics)):
                ddp_error = relative(tensors(s_two[part]), tensors(s_one[part]))
                rounding = relative(tensors(s_noise[part]), tensors(s_one[part]))
                assert ddp_error <= max(1e-4, 3 * rounding), (name, part, kind, ddp_error, rounding)
        assert not list(two.glob("**/.*.tmp")), "a half-written file"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_a_killed_rank_is_restarted_and_the_run_resumes(tmp_path, blobs100):
    """torchrun --max-restarts=1 with train.resume=auto: SIGKILL one rank after the checkpoint of step
    4; the group restarts, resumes from that checkpoint and ends with the weights of an uninterrupted
    2-process run."""
    recipe, extra = recipe_of("emp_ssl")
    common = [*BASE, *extra, f"data.root={blobs100}", f"train.out={tmp_path}", "data.batch_size=20",
              "train.epochs=4", "train.checkpoint_every=4", "train.keep_checkpoints=10"]  # 20 steps
    proc = subprocess.run(torchrun("-m", "onepoch", "train", recipe, *common, "name=reference"), env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = ["-m", "onepoch", "train", recipe, *common, "name=killed", "train.resume=auto"]
    launcher = subprocess.Popen(torchrun(*args, restarts=1), env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    run = tmp_path / "killed"
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_0000004.pt").exists():
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.05)
    killed_at = time.time()
    workers = _children(launcher.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)  # rank 1 (started second)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    final = load_checkpoint(checkpoint_paths(run)[-1])
    expected = load_checkpoint(checkpoint_paths(tmp_path / "reference")[-1])
    assert final["step"] == expected["step"] == 20
    for key, ref in expected["model"].items():
        assert torch.equal(final["model"][key], ref), key
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 21))  # one line per step, none twice
    assert all(r["time"] < killed_at for r in lines[:4])  # steps 1-4 were not run again: it resumed
    assert not [p for p in run.rglob("*") if p.name.startswith(".")], "a half-written file was left"


def run_two(tmp_path, blobs100, *extra, timeout=300):
    recipe, heads = recipe_of("emp_ssl")
    return subprocess.run([sys.executable, "-m", "onepoch", "train", recipe, *BASE, *heads, f"data.root={blobs100}",
                           f"train.out={tmp_path}", "--nproc", "2", *extra], env=env(), capture_output=True,
                          text=True, timeout=timeout)


def test_bad_distributed_input_gets_one_line_errors(tmp_path, blobs100):
    proc = run_two(tmp_path, blobs100, "data.batch_size=15")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "onepoch: error: data.batch_size 15 (the global batch) is not divisible by the 2 processes; use a "
        "multiple of 2"]
    if not torch.cuda.is_available():
        proc = run_two(tmp_path, blobs100, "train.backend=nccl")
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            "onepoch: error: train.backend nccl needs CUDA devices, and none is available; use gloo (CPU)"]
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow
def test_ranks_with_different_configs_stop_before_writing(tmp_path, blobs100):
    """Two ranks started by hand with different learning rates: both stop with the same one-line error."""
    recipe, heads = recipe_of("emp_ssl")
    procs = []
    for rank, lr in ((0, "0.3"), (1, "0.5")):
        environment = {**env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29400 + os.getpid() % 500)}
        procs.append(subprocess.Popen([sys.executable, "-m", "onepoch", "train", recipe, *BASE, *heads,
                                       f"data.root={blobs100}", f"train.out={tmp_path}", "name=mixed",
                                       f"optim.lr={lr}"], env=environment, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2
        assert err.strip().splitlines()[-1] == ("onepoch: error: the processes were given different configs: "
                                                "rank 1 differs from rank 0 in optim.lr (0.3 -> 0.5)")
    assert not (tmp_path / "mixed").exists()


def test_stop_leaves_the_process_group_before_the_process_exits(tmp_path):
    """A rank leaves its process group before it returns (a barrier first, so no rank leaves while
    another still sends), and stop() may be called again; here on a 1-process gloo group."""
    import torch.distributed as dist

    from onepoch.distributed import stop

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    stop()
    assert not dist.is_initialized()
    stop()                                                            # nothing joined: a no-op


@pytest.mark.parametrize("fails", [False, True])
def test_onepoch_train_leaves_the_process_group_however_training_ends(tmp_path, blobs100, monkeypatch, fails):
    """`onepoch train` calls stop() once training returns (with a barrier) or raises (without one:
    another rank may be gone)."""
    import onepoch.distributed
    import onepoch.train
    from onepoch.cli import main

    calls = []
    monkeypatch.setattr(onepoch.distributed, "stop", lambda wait=True: calls.append(wait))
    if fails:
        def broken(*args, **kwargs):
            raise onepoch.train.TrainingError("broken")

        monkeypatch.setattr(onepoch.train, "train", broken)
    recipe, heads = recipe_of("emp_ssl")
    code = main(["train", recipe, *BASE, *heads, f"data.root={blobs100}", f"train.out={tmp_path}",
                 "train.max_steps=1"])
    assert (code, calls) == ((2, [False]) if fails else (0, [True]))


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_torchrun_worker_ends_without_the_interpreters_teardown(world_size):
    """The fix of the torchrun abort (the test below shows its cause): a worker (WORLD_SIZE > 1) started
    as `python -m onepoch` ends with os._exit once its output is flushed, so the interpreter does not
    finalize (no atexit handler runs); its output and exit status stay. A plain process exits as before."""
    code = ("import atexit, runpy, sys; atexit.register(lambda: print('teardown ran', flush=True)); "
            "sys.argv = ['onepoch', 'recipes']; runpy.run_module('onepoch', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], env={**env(), "WORLD_SIZE": world_size, "RANK": "0"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "emp_ssl/fashion_mnist_demo" in proc.stdout                 # the command's output is all there
    assert ("teardown ran" in proc.stdout) == (world_size == "1")


# A worker where gloo's thread needs the interpreter while it finalizes: the callback of rank 1's all-reduce
# runs on that thread when the all-reduce completes, which rank 0 delays by 1 s, by when rank 1 has ended
# its Python code and sits in the interpreter's finalization (held there by a module global's __del__).
FINALIZATION_RACE = """\
import os, sys, time
import torch
import torch.distributed as dist
from onepoch import distributed

world = distributed.launched_world()
distributed.start(world, "gloo", "cpu")
x = torch.ones(1000)
if world.rank == 0:                       # joins late, exits without a teardown either way
    time.sleep(1)
    dist.all_reduce(x, async_op=True)
    time.sleep(2)
    os._exit(0)


class HeldFinalization:
    def __del__(self):                    # runs while the interpreter finalizes its modules
        time.sleep(10)


held = HeldFinalization()
work = dist.all_reduce(x, async_op=True)
work.get_future().then(lambda future: None)   # Python code, to be run on gloo's thread
print("rank 1 done", flush=True)
if sys.argv[1] == "exit_process":
    distributed.exit_process(0)
raise SystemExit(0)                       # the interpreter's own exit, as before the fix
"""


@pytest.mark.slow
@pytest.mark.parametrize("exit_path", ["teardown", "exit_process"])
def test_the_torchrun_abort_is_gloos_thread_meeting_a_finalizing_interpreter(tmp_path, exit_path):
    """Issue 29, the torchrun abort, found: a native backtrace of an aborted rank (an LD_PRELOAD SIGABRT
    handler, docs/reliability.md) shows gloo's worker thread (ProcessGroupGloo::runLoop) releasing the last
    reference to a tensor whose Python object it owned (TensorImpl::decref_pyobject), which takes the
    GIL; the interpreter was finalizing, so CPython ended that thread with pthread_exit, whose forced
    unwinding met a noexcept frame: std::terminate, `terminate called without an active exception`.
    Whether the last collective's release comes before or during finalization is a race (1 in 23 to
    150 training launches). This worker forces the same path: its Python callback must run on gloo's
    thread during finalization. With the interpreter's own exit the rank aborts, every time; ending with
    onepoch.distributed.exit_process (os._exit after flushing, what `python -m onepoch` does under
    torchrun) skips the finalization, and the launch succeeds."""
    (tmp_path / "worker.py").write_text(FINALIZATION_RACE)
    proc = subprocess.run(torchrun(str(tmp_path / "worker.py"), exit_path), env=env(), capture_output=True,
                          text=True, timeout=120)
    assert "rank 1 done" in proc.stdout
    if exit_path == "teardown":
        assert proc.returncode != 0
        assert "terminate called without an active exception" in proc.stderr
        assert re.search(r"rank\s*:\s*1.*?\n\s*exitcode\s*:\s*-6", proc.stderr, re.S), proc.stderr[-2000:]
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "terminate called" not in proc.stderr
