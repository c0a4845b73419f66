"""Reliability (docs/reliability.md): exact resume after SIGKILL at seeded-random points, atomic writes
under a crash or a full disk, NaN/inf losses and gradients, out-of-memory advice, safe checkpoint
loading, and a battery of bad inputs driven through the real command line: each ends in one line
``onepoch: error: ...``, a non-zero exit, no traceback, and leaves what was written before intact."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fnmatch
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import write_idx_dir
from test_source_cifar import fake_cifar, planar_rows, py2_pickle, write_archive
from test_source_npz import jpeg_arrays, jpeg_bytes
from test_train import TINY, make_blobs

import onepoch.atomic
import onepoch.eval
import onepoch.methods.emp_ssl as emp
import onepoch.checkpoints
import onepoch.train
from onepoch.checkpoints import checkpoint_paths, load_checkpoint
from onepoch.cli import main
from onepoch.data import cifar
from onepoch.runconfig import load_config
from onepoch.train import train

RECIPE = "emp_ssl/fashion_mnist_demo"


# ---------------------------------------------------------------------------------------------- helpers


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onepoch: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


def run_args(root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", RECIPE, *TINY, f"data.root={root}", f"train.out={out}", f"name={name}", *extra]


class _Exploit:
    """Unpickling this calls os.mkdir(marker): a file that would run code when loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class _FullDisk:
    """A writable file that accepts ``room`` bytes, then fails like a full disk (ENOSPC)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def fill_disk(monkeypatch, module, pattern: str, room: int = 8) -> None:
    """Make ``module``'s atomic writes of files named like ``pattern`` run out of disk after ``room``
    bytes (the real :func:`onepoch.atomic.atomic_open` underneath: temporary file, fsync, rename)."""
    real_open = onepoch.atomic.atomic_open

    @contextlib.contextmanager
    def full_open(path, mode="wb"):
        with real_open(path, mode) as f:
            yield _FullDisk(f, room) if fnmatch.fnmatch(Path(path).name, pattern) else f

    def full_write_text(path, text):
        with full_open(path, "wb") as f:
            f.write(text.encode("utf-8"))

    for name, fake in (("atomic_open", full_open), ("atomic_write_text", full_write_text)):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, fake)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith((".tmp", ".partial"))]


def fresh_run(blobs: Path, out: Path, name: str = "base") -> Path:
    """A run of 3 steps (a checkpoint at 3) of the tiny EMP-SSL config, at ``out/name``."""
    config = load_config(RECIPE, [*TINY, f"data.root={blobs}", f"train.out={out}", f"name={name}", "train.max_steps=3"])
    return train(config, progress_bar=False).run_dir


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A prepared dataset and a run of 3 steps (checkpoint at 3) that failing commands must not touch."""
    root = tmp_path_factory.mktemp("reliability")
    blobs = make_blobs(root / "blobs")
    return blobs, fresh_run(blobs, root / "runs")


# ---------------------------------------------------------------------------------------------- exact resume


def _logged_steps(run: Path) -> int:
    try:
        return (run / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _kill_chain(run: Path, cmd: list[str], kill_at: list[int]) -> None:
    """Start ``cmd``, SIGKILL it once metrics.jsonl reaches step ``kill_at[0]``, resume it and kill it
    again at ``kill_at[1]``, ...; finally resume it to the end."""
    env = {**os.environ, "ONEPOCH_PROGRESS": "0"}
    for i, k in enumerate(kill_at):
        # A resumed run first rewrites metrics.jsonl up to its checkpoint (a new file): count after that.
        stale = _inode(run / "metrics.jsonl") if i else None
        proc = subprocess.Popen([*cmd, *(["--resume"] if i else [])], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not (
                _inode(run / "metrics.jsonl") not in (None, stale) and _logged_steps(run) >= k):
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before step {k}: {err.decode()}"
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _assert_same_final_state(killed: Path, clean: Path, steps: int) -> None:
    a = load_checkpoint(checkpoint_paths(killed)[-1])
    b = load_checkpoint(checkpoint_paths(clean)[-1])
    assert a["step"] == b["step"] == steps
    for part in ("model", "probe"):
        assert a[part].keys() == b[part].keys()
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))


KILL_CHAINS = {  # method: (recipe, overrides, steps of the whole run, seed of the kill points, kill points)
    # seed 5: steps 2 (before the first checkpoint), 24 (just when checkpoint 24 is due) and 29 (between two)
    "emp_ssl": (RECIPE, [*TINY, "train.epochs=5", "train.checkpoint_every=4"], 40, 5, 3),
    # seed 7: steps 13 and 19 (each one step past a checkpoint)
    "byol": ("byol/fashion_mnist_1epoch", ["model.arch=resnet10", "model.width=0.0625", "data.batch_size=8",
                                            "views.size=8", "train.threads=1", "method.projector=32-16",
                                            "method.predictor=32-16", "train.epochs=3", "train.checkpoint_every=3"],
             24, 7, 2),
}


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path, base):
    """Real `onepoch train` processes are SIGKILLed at seeded-random steps (3 for EMP-SSL, 2 for BYOL with
    its EMA target) and resumed each time; each ends with the weights of an uninterrupted run. The two
    chains of processes run side by side (threads waiting on subprocesses) to halve the wall time."""
    blobs, _ = base
    jobs = {}
    for method, (recipe, overrides, total, seed, kills) in KILL_CHAINS.items():
        args = [*overrides, f"data.root={blobs}", f"train.out={tmp_path / method}"]
        kill_at = sorted(np.random.default_rng(seed).choice(np.arange(2, total - 3), kills, replace=False).tolist())
        jobs[method] = (recipe, args, total, kill_at)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        chains = {m: pool.submit(_kill_chain, tmp_path / m / "killed",
                                 [sys.executable, "-m", "onepoch", "train", recipe, *args, "name=killed"], kill_at)
                  for m, (recipe, args, _, kill_at) in jobs.items()}
        cleans = {m: train(load_config(recipe, [*args, "name=clean"]), progress_bar=False).run_dir
                  for m, (recipe, args, _, _) in jobs.items()}
        for future in chains.values():
            future.result()
    for method, (_, _, total, _) in jobs.items():
        _assert_same_final_state(tmp_path / method / "killed", cleans[method], total)


# ---------------------------------------------------------------------------------------------- atomic writes


_DIE_MID_CHECKPOINT = """
import os, signal, sys
from pathlib import Path
from onepoch.checkpoints import checkpoint_paths, load_checkpoint, save_checkpoint

class HalfThenDie:  # the file atomic_open writes to: half of the checkpoint reaches the disk, then SIGKILL
    def __init__(self, f):
        self.f = f
    def write(self, data):
        data = memoryview(data).cast("B")
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

real_fdopen = os.fdopen
os.fdopen = lambda fd, *args, **kwargs: HalfThenDie(real_fdopen(fd, *args, **kwargs))
run = Path(sys.argv[1])
state = load_checkpoint(checkpoint_paths(run)[-1])
state["step"] += 1
save_checkpoint(run, state, keep=1)
"""


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, base, capsys):
    blobs, _ = base
    run = fresh_run(blobs, tmp_path / "runs")
    before = tree_bytes(run / "checkpoints")
    proc = subprocess.run([sys.executable, "-c", _DIE_MID_CHECKPOINT, str(run)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step_0000004.pt.")  # it died mid-write
    assert {k: v for k, v in tree_bytes(run / "checkpoints").items() if not k.endswith(".tmp")} == before
    assert load_checkpoint(checkpoint_paths(run)[-1])["step"] == 3
    code, out, err = cli(capsys, *run_args(blobs, tmp_path / "runs", "base", "train.max_steps=5"), "--resume")
    assert code == 0 and "trained to step 5" in out, err


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, base, capsys, monkeypatch):
    blobs, _ = base
    run = fresh_run(blobs, tmp_path / "runs")
    before = tree_bytes(run / "checkpoints")
    with monkeypatch.context() as m:
        fill_disk(m, onepoch.checkpoints, "step_*.pt")
        code, _, err = cli(capsys, *run_args(blobs, tmp_path / "runs", "base", "train.max_steps=6"), "--resume")
    assert_one_line_error(code, err, "No space left on device")
    assert tree_bytes(run / "checkpoints") == before and no_temp_files(run)
    code, out, err = cli(capsys, *run_args(blobs, tmp_path / "runs", "base", "train.max_steps=6"), "--resume")
    assert code == 0 and "trained to step 6" in out, err
    clean = train(load_config(RECIPE, [*TINY, f"data.root={blobs}", f"train.out={tmp_path / 'runs'}", "name=clean",
                                       "train.max_steps=6"]), progress_bar=False)
    a, b = load_checkpoint(checkpoint_paths(run)[-1]), load_checkpoint(checkpoint_paths(clean.run_dir)[-1])
    assert a["step"] == b["step"] == 6 and all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


def test_full_disk_while_writing_eval_json_keeps_the_previous_one(tmp_path, base, capsys, monkeypatch):
    _, template = base
    run = tmp_path / "run"
    shutil.copytree(template, run)
    args = ["eval", run, "--probe", "knn", "--features", "full"]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    before = tree_bytes(run)
    assert b'"knn"' in before["eval.json"]
    fill_disk(monkeypatch, onepoch.eval, "eval.json")
    code, _, err = cli(capsys, *args)
    assert_one_line_error(code, err, "No space left on device")
    assert tree_bytes(run) == before


def test_full_disk_while_writing_online_probe_json_keeps_the_previous_one(tmp_path, base, capsys, monkeypatch):
    blobs, _ = base
    args = run_args(blobs, tmp_path / "runs", "full", "train.epochs=1")  # 8 steps: the probe is tested at the end
    assert cli(capsys, *args)[0] == 0
    run = tmp_path / "runs" / "full"
    # a report of another step (as from a shorter run): resuming the finished run tests the probe again
    report = json.loads((run / "online_probe.json").read_text())
    (run / "online_probe.json").write_text(json.dumps({**report, "step": 7}))
    before = tree_bytes(run)
    fill_disk(monkeypatch, onepoch.train, "online_probe.json")
    code, _, err = cli(capsys, *args, "--resume")  # a finished run: only the probe report is written again
    assert_one_line_error(code, err, "No space left on device")
    assert tree_bytes(run) == before


def test_full_disk_while_preparing_keeps_the_previous_dataset(tmp_path, capsys, monkeypatch):
    out = make_blobs(tmp_path / "out")
    before = tree_bytes(out)
    source = write_idx_dir(tmp_path / "src")

    def save_then_fill_disk(path, array, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with monkeypatch.context() as m:
        m.setattr(np, "save", save_then_fill_disk)
        code, _, err = cli(capsys, "prepare", "mnist", "--source", source, "--out", out, "--force")
    assert_one_line_error(code, err, r"No space left on device: .*images\.npy")
    assert tree_bytes(out) == before and no_temp_files(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ---------------------------------------------------------------------------------------------- numerical faults


def _checkpoint_kept_at_step_3(run: Path) -> None:
    assert [p.name for p in checkpoint_paths(run)] == ["step_0000003.pt"]
    state = load_checkpoint(checkpoint_paths(run)[0])
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # the failing step is the 5th (the 5th call of the loss): metrics.jsonl holds steps 1..4, as the message says
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


SMALL_SIMCLR = ["model.arch=resnet10", "model.width=0.0625", "data.batch_size=8", "views.size=8", "train.threads=1",
                "method.projector=32-16"]


@pytest.mark.parametrize("recipe, extra", [
    (RECIPE, [*TINY, "optim.name=sgd"]),                               # a Cholesky of blown-up (finite) numbers
    (RECIPE, [*TINY, "optim.name=adamw"]),
    ("simclr/fashion_mnist_1epoch", [*SMALL_SIMCLR, "optim.name=sgd"]),   # BatchNorm's running_var overflows
], ids=["emp_ssl sgd", "emp_ssl adamw", "simclr sgd"])
def test_a_blown_up_run_is_stopped_by_the_guard_and_keeps_only_finite_checkpoints(tmp_path, base, capsys, recipe,
                                                                                  extra):
    """Issue 29: optim.lr=1e9. EMP-SSL ended in a LinAlgError traceback from TCR's Cholesky; SimCLR was
    stopped one step late, naming step 3 where metrics.jsonl said 4, and its checkpoints held inf in
    BatchNorm's running_var. Now: one line naming the first bad step as metrics.jsonl numbers it, and
    every checkpoint kept (one per step here) holds only finite tensors, buffers and probe included."""
    blobs, _ = base
    code, _, err = cli(capsys, "train", recipe, *extra, f"data.root={blobs}", f"train.out={tmp_path}", "name=t",
                       "optim.lr=1e9", "train.epochs=3", "train.checkpoint_every=1", "train.keep_checkpoints=10")
    assert_one_line_error(code, err, r"(non-finite \(or overflowing\) weights or buffers after|linear algebra "
                          r"failed at|loss is (nan|inf) at|non-finite gradient at) step \d+ .*lower optim\.lr.*the last good checkpoint is kept|"
                          r"loss is (nan|inf) at step \d+")
    named = int(re.search(r"step (\d+)", err).group(1))
    logged = [json.loads(line)["step"] for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, named)), (named, logged)          # the named step is the one after the last line
    kept = checkpoint_paths(tmp_path / "t")
    assert kept and [load_checkpoint(p)["step"] for p in kept] == list(range(1, named))
    for path in kept:
        state = load_checkpoint(path)
        for part in ("model", "probe"):
            for key, tensor in state[part].items():
                assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), f"{path.name} {part}.{key}"


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_loss_stops_naming_the_step_and_the_part(tmp_path, base, capsys, monkeypatch, value):
    blobs, _ = base
    real, calls = emp.emp_ssl_loss, {"n": 0}

    def flaky(z, **kw):
        loss, parts = real(z, **kw)
        calls["n"] += 1
        if calls["n"] == 5:
            return loss + float(value), {**parts, "tcr": parts["tcr"] + float(value)}
        return loss, parts

    monkeypatch.setattr(emp, "emp_ssl_loss", flaky)
    code, _, err = cli(capsys, *run_args(blobs, tmp_path, "t"))
    assert_one_line_error(code, err, rf"loss is {value} at step 5 \(invariance=.*tcr={value}\); the last good "
                          r"checkpoint")
    _checkpoint_kept_at_step_3(tmp_path / "t")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_gradient_stops_naming_the_step_and_the_parameter(tmp_path, base, capsys, monkeypatch, value):
    """The loss is finite, but one parameter's gradient is poisoned at the 5th step."""
    blobs, _ = base
    real_build, poisoned = onepoch.train.build_model, {}

    def build(config, in_chans):
        model = real_build(config, in_chans)
        name, param = list(model.named_parameters())[-1]
        poisoned["name"], calls = name, {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return torch.full_like(grad, float(value)) if calls["n"] == 5 else grad

        param.register_hook(hook)
        return model

    monkeypatch.setattr(onepoch.train, "build_model", build)
    code, _, err = cli(capsys, *run_args(blobs, tmp_path, "t"))
    assert_one_line_error(code, err, r"non-finite gradient at step 5 \(the loss is finite: invariance=.*tcr=.*\) in "
                          rf"1 parameter\(s\): {re.escape(poisoned['name'])}; the last good checkpoint")
    _checkpoint_kept_at_step_3(tmp_path / "t")


@pytest.mark.parametrize("error", [
    lambda: getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)("CUDA out of memory. Tried to allocate 2 GiB"),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                         "to allocate 2147483648 bytes"),
], ids=["cuda", "cpu"])
def test_out_of_memory_gives_advice_and_keeps_the_checkpoint(tmp_path, base, capsys, monkeypatch, error):
    blobs, _ = base
    real, calls = emp.emp_ssl_loss, {"n": 0}

    def runs_out(z, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise error()
        return real(z, **kw)

    monkeypatch.setattr(emp, "emp_ssl_loss", runs_out)
    code, _, err = cli(capsys, *run_args(blobs, tmp_path, "t"))
    assert_one_line_error(code, err, r"out of memory at step 5 on cpu \(8 images x 4 views per step\): lower "
                          r"data.batch_size or views.count; the last good checkpoint")
    _checkpoint_kept_at_step_3(tmp_path / "t")


# ---------------------------------------------------------------------------------------------- bad inputs: prepare


def idx_bytes(a: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else (0x803 if a.ndim == 3 else 0x801)
    return struct.pack(">I", magic) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def _idx(d: Path, stem: str, data: bytes) -> list:
    """Valid gzipped IDX files, with ``stem`` replaced by a plain file holding ``data``."""
    write_idx_dir(d)
    (d / stem).write_bytes(data)
    return ["mnist", "--source", d]


def _idx_corrupt_gzip(d: Path) -> list:
    write_idx_dir(d)
    path = d / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    return ["mnist", "--source", d]


def _cifar(d: Path, change=None, raw: bytes | None = None) -> list:
    """A fake cifar-10-python.tar.gz whose data_batch_1 is changed by ``change(batch)`` (or replaced by
    the pickle ``raw``)."""
    members, _, _ = fake_cifar("cifar10", per_batch=2)
    if change is not None:
        rng = np.random.default_rng(0)
        batch = {b"data": planar_rows(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)), b"labels": [1, 2]}
        change(batch)
        members["data_batch_1"] = py2_pickle(batch)
    if raw is not None:
        members["data_batch_1"] = raw
    d.mkdir(parents=True)
    return ["cifar10", "--source", write_archive(d / cifar.LAYOUTS["cifar10"].archive, "cifar-10-batches-py", members)]


def _cifar_cut(d: Path) -> list:
    args = _cifar(d)
    args[2].write_bytes(args[2].read_bytes()[: args[2].stat().st_size // 2])
    return args


def _not_a_tar(d: Path) -> list:
    d.mkdir(parents=True)
    path = d / "cifar-10-python.tar.gz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return ["cifar10", "--source", path]


def _npz(d: Path, **arrays) -> list:
    base = {"x_train": np.zeros((6, 8, 8), np.uint8), "y_train": np.arange(6) % 2,
            "x_test": np.zeros((2, 8, 8), np.uint8), "y_test": np.array([0, 1])}
    base.update(arrays)
    d.mkdir(parents=True)
    np.savez(d / "data.npz", **base)
    return ["npz", "--source", d / "data.npz"]


def _npz_cut(d: Path) -> list:
    args = _npz(d)
    args[2].write_bytes(args[2].read_bytes()[:300])
    return args


def _npz_garbage(d: Path) -> list:
    d.mkdir(parents=True)
    (d / "data.npz").write_bytes(b"\x1f\x8b\x08 this is gzip, not a zip archive")
    return ["npz", "--source", d / "data.npz"]


def _npz_cut_jpeg(d: Path) -> list:
    arrays = jpeg_arrays()
    data, offsets = arrays["train_jpeg"], arrays["train_offsets"].copy()
    start, end = int(offsets[1]), int(offsets[2])
    keep = start + (end - start) // 2  # image 1 loses its second half
    arrays["train_jpeg"] = np.concatenate([data[:keep], data[end:]])
    offsets[2:] -= end - keep
    arrays["train_offsets"] = offsets
    d.mkdir(parents=True)
    np.savez(d / "data.npz", **arrays)
    return ["npz", "--source", d / "data.npz"]


def _folder(d: Path, files: dict[str, bytes]) -> list:
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return ["folder", "--source", d, "--size", "8"]


def _jpeg(seed: int = 0) -> bytes:
    return jpeg_bytes(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8))


def _corrupt_jpeg_header() -> bytes:
    data = bytearray(_jpeg())
    data[2:40] = b"\x00" * 38  # the segment markers after SOI are gone
    return bytes(data)


GOOD_FOLDER = {"cat/a.jpg": _jpeg(1), "cat/b.jpg": _jpeg(2), "dog/c.jpg": _jpeg(3), "dog/d.jpg": _jpeg(4)}

PREPARE_CASES = {
    "idx truncated": (lambda d: _idx(d, "train-images-idx3-ubyte",
                                     idx_bytes(np.zeros((30, 28, 28), np.uint8))[:-100]),
                      r"train-images-idx3-ubyte: truncated IDX data"),
    "idx header cut short": (lambda d: _idx(d, "t10k-labels-idx1-ubyte", b"\x00\x00\x08"),
                             r"t10k-labels-idx1-ubyte: truncated IDX header"),
    "idx corrupt gzip": (_idx_corrupt_gzip, r"train-images-idx3-ubyte\.gz: "),
    "idx wrong magic": (lambda d: _idx(d, "train-images-idx3-ubyte",
                                       idx_bytes(np.zeros((30, 28, 28), np.uint8), magic=0x00000801)),
                        r"not an IDX images file \(magic 0x00000801, expected 0x00000803\)"),
    "idx image/label count mismatch": (lambda d: _idx(d, "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(12, np.uint8))),
                                       r"has 10 images but .*t10k-labels-idx1-ubyte has 12 labels"),
    "idx label out of range": (lambda d: _idx(d, "train-labels-idx1-ubyte", idx_bytes(np.full(30, 10, np.uint8))),
                               r"label 10 is out of range \(expected 0\.\.9\)"),
    "tar truncated": (_cifar_cut, r"cifar-10-python\.tar\.gz: .*(truncated or corrupt|is the archive complete)"),
    "tar corrupt": (_not_a_tar, r"cifar-10-python\.tar\.gz: cannot read .*truncated or corrupt"),
    "cifar image/label count mismatch": (lambda d: _cifar(d, lambda b: b.update({b"labels": [1, 2, 3]})),
                                         r"data_batch_1: expected 2 integer labels"),
    "cifar label out of range": (lambda d: _cifar(d, lambda b: b.update({b"labels": [1, 10]})),
                                 r"data_batch_1: labels must lie in 0\.\.9, found 1\.\.10"),
    "cifar wrong dtype": (lambda d: _cifar(d, lambda b: b.update({b"data": b[b"data"].astype(np.float32)})),
                          r"data_batch_1: 'data' must be uint8 \(n, 3072\), found float32"),
    "cifar pickle that runs code": (lambda d: _cifar(d, raw=pickle.dumps(_Exploit(d / "pwned"), protocol=2)),
                                    r"data_batch_1: refusing to unpickle posix\.mkdir"),
    "npz truncated": (_npz_cut, r"data\.npz: (not a readable \.npz file|cannot read array)"),
    "npz wrong magic": (_npz_garbage, r"data\.npz: not an \.npz file \(no zip signature\)"),
    "npz NaN float images": (lambda d: _npz(d, x_train=np.full((6, 8, 8), np.nan, np.float32)),
                             r"train images must be uint8, got float32"),
    "npz float labels": (lambda d: _npz(d, y_train=np.zeros(6, np.float64)),
                         r"y_train must be a 1-D integer array, found float64"),
    "npz image/label count mismatch": (lambda d: _npz(d, y_train=np.arange(5) % 2),
                                       r"train: 6 images but 5 labels"),
    "npz label out of range": (lambda d: _npz(d, y_test=np.array([0, 2]), class_names=np.array(["a", "b"])),
                               r"label 2 has no class name \(class_names has 2 entries\)"),
    "npz truncated JPEG": (_npz_cut_jpeg, r"train image 1 is not a valid JPEG"),
    "folder corrupt JPEG": (lambda d: _folder(d, {**GOOD_FOLDER, "dog/e.jpg": _corrupt_jpeg_header()}),
                            r"dog/e\.jpg: cannot decode image"),
    "folder truncated JPEG": (lambda d: _folder(d, {**GOOD_FOLDER, "cat/e.jpg": _jpeg(5)[:200]}),
                              r"cat/e\.jpg: cannot decode image"),
    "folder with empty class folders": (lambda d: (_folder(d, {}), (d / "cat").mkdir(), (d / "dog").mkdir())[0],
                                        r"cat: class folder contains no images"),
    "folder with a single class": (lambda d: _folder(d, {"cat/a.jpg": _jpeg(1), "cat/b.jpg": _jpeg(2)}),
                                   r"has a single class folder \('cat'\)"),
}


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A prepared dataset that every failing `prepare --force --out` below must leave byte-identical."""
    out = make_blobs(tmp_path_factory.mktemp("prepare") / "out")
    return out, tree_bytes(out)


@pytest.mark.parametrize("case", list(PREPARE_CASES))
def test_bad_source_is_one_line_and_the_existing_dataset_survives(tmp_path, capsys, existing, case):
    make, pattern = PREPARE_CASES[case]
    args = make(tmp_path / "src")
    out, before = existing
    code, _, err = cli(capsys, "prepare", *args, "--out", out, "--force")
    assert_one_line_error(code, err, pattern)
    assert tree_bytes(out) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no staging directory left
    assert not (tmp_path / "src" / "pwned").exists()  # the pickled code never ran


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode: chmod 000 cannot block it")
@pytest.mark.parametrize("kind", ["idx", "folder"])
def test_unreadable_source_file_is_one_line(tmp_path, capsys, existing, kind):
    if kind == "idx":
        args = _idx(tmp_path / "src", "t10k-images-idx3-ubyte", idx_bytes(np.zeros((10, 28, 28))))
        path = tmp_path / "src" / "t10k-images-idx3-ubyte"
    else:
        args, path = _folder(tmp_path / "src", GOOD_FOLDER), tmp_path / "src" / "dog" / "c.jpg"
    path.chmod(0)
    try:
        out, before = existing
        code, _, err = cli(capsys, "prepare", *args, "--out", out, "--force")
        assert_one_line_error(code, err, rf"{re.escape(path.name)}: .*(Permission denied|permission)")
        assert tree_bytes(out) == before
    finally:
        path.chmod(0o644)


# ---------------------------------------------------------------------------------------------- bad inputs: dataset


def _flip_last_image_byte(root: Path) -> str:
    path = root / "train" / "images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return r"train/images\.npy: checksum does not match meta\.json"


def _flip_test_image_byte(root: Path) -> str:
    path = root / "test" / "images.npy"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return r"test/images\.npy: checksum does not match meta\.json"


def _no_checksum(root: Path) -> str:
    meta = json.loads((root / "train" / "meta.json").read_text())
    del meta["sha256"]
    (root / "train" / "meta.json").write_text(json.dumps(meta))
    return r"train/meta\.json records no sha256 of images\.npy \(prepare it again\)"


def _label_out_of_range(root: Path) -> str:
    """A test label past the classes, with meta.json's checksum updated to match (a bad writer, not a
    damaged disk)."""
    from onepoch.data.checksum import array_sha256

    labels = np.load(root / "test" / "labels.npy")
    labels[3] = 7
    np.save(root / "test" / "labels.npy", labels)
    meta = json.loads((root / "test" / "meta.json").read_text())
    meta["sha256"]["labels"] = array_sha256(labels)
    (root / "test" / "meta.json").write_text(json.dumps(meta))
    return r"test/labels\.npy: label 7 \(image 3\) is outside the 4 classes \[0, 3\]"


def _cut_images(root: Path) -> str:
    path = root / "train" / "images.npy"
    path.write_bytes(path.read_bytes()[:-500])
    return r"train.*cannot read arrays|images\.npy: expected uint8"


def _float_labels(root: Path) -> str:
    np.save(root / "train" / "labels.npy", np.zeros(64, np.float64))
    return r"labels\.npy: expected int64 \(64,\), found float64"


def _no_dataset_json(root: Path) -> str:
    (root / "dataset.json").unlink()
    return r"is not an onepoch prepared dataset \(no valid dataset\.json\)"


@pytest.mark.parametrize("damage", [_flip_last_image_byte, _flip_test_image_byte, _cut_images, _float_labels,
                                    _no_dataset_json, _no_checksum, _label_out_of_range],
                         ids=["checksum mismatch", "test split checksum mismatch", "truncated images.npy",
                              "float labels.npy", "no dataset.json", "no checksum in meta.json",
                              "a test label past the classes"])
def test_damaged_prepared_dataset_stops_training_before_the_run_starts(tmp_path, capsys, damage):
    root = make_blobs(tmp_path / "blobs")
    pattern = damage(root)
    code, _, err = cli(capsys, *run_args(root, tmp_path / "runs", "t"))
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- bad inputs: config


def _broken_yaml(tmp_path: Path) -> str:
    (tmp_path / "recipe.yaml").write_text("data:\n  root: [unclosed\n")
    return str(tmp_path / "recipe.yaml")


CONFIG_CASES = {
    "unknown key": (["optim.lrr=0.1"], r"unknown optim key 'lrr' \(did you mean 'lr'\?\)"),
    "mistyped section": (["trian.epochs=2"], r"unknown config key 'trian\.epochs' \(did you mean 'train'\?\)"),
    "mistyped method key": (["method.projectr=32-16"], r"unknown method key 'projectr' \(did you mean 'projector'\?\)"),
    "mistyped view key": (["views.cout=3"], r"unknown ViewSpec key 'cout' \(did you mean 'count'\?\)"),
    "wrong value type": (["train.epochs=one"], r"train\.epochs: expected an? (number|integer), got 'one'"),
    "negative lr": (["optim.lr=-0.1"], r"optim\.lr must be a finite number > 0, got -0\.1"),
    "NaN lr": (["optim.lr=.nan"], r"optim\.lr must be a finite number > 0, got nan"),
    "infinite lr": (["optim.lr=.inf"], r"optim\.lr must be a finite number > 0, got inf"),
    "0 patches": (["views.count=0"], r"ViewSpec\.count = 0: must be >= 1"),
    "0 images per batch": (["data.batch_size=0"], r"data\.batch_size must be >= 1, got 0"),
    "one patch for EMP-SSL": (["views.count=1"], r"emp_ssl compares views of the same image and needs at least 2 "
                              r"views per image; the views section gives 1 \(views\.count=1\)"),
    "a negative seed": (["seed=-1"], r"seed must be >= 0, got -1"),
    "a device onepoch does not train on": (["train.device=mps"], r"train\.device 'mps' is not a device onepoch "
                                           r"trains on \(use auto, cpu, cuda or cuda:N\)"),
    "one image per step": (["data.batch_size=1"], r"data\.batch_size 1 gives 1 image per process and step; "
                           r"BatchNorm and the losses need at least 2"),
    "batch larger than the dataset": (["data.batch_size=65"],
                                      r"data\.batch_size 65 is larger than the train split \(64 images\)"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_one_line_and_the_run_directory_survives(tmp_path, base, capsys, case):
    """Every case also names an existing run with --resume: it must be left exactly as it was."""
    blobs, run = base
    extra, pattern = CONFIG_CASES[case]
    before = tree_bytes(run)
    code, _, err = cli(capsys, *run_args(blobs, run.parent, "base", *extra), "--resume")
    assert_one_line_error(code, err, pattern)
    assert tree_bytes(run) == before
    code, _, err = cli(capsys, *run_args(blobs, tmp_path / "runs", "new", *extra))  # a new run: nothing created
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("recipe, views", [("simclr/fashion_mnist_1epoch", ["views.count=1"]),
                                           ("byol/fashion_mnist_1epoch", ["views.groups=[{count: 1}]",
                                                                          "method.predictor=32-16"])])
def test_one_view_for_a_method_that_compares_two_is_refused_before_the_run_directory(tmp_path, base, capsys,
                                                                                      recipe, views):
    """Issue 29: SimCLR with views.count=1 ended in a ValueError traceback from the loss, leaving the run
    directory behind, so the corrected command was refused ('already exists')."""
    blobs, _ = base
    args = ["train", recipe, *SMALL_SIMCLR, f"data.root={blobs}", f"train.out={tmp_path / 'runs'}", "name=t",
            "train.max_steps=1"]
    code, _, err = cli(capsys, *args, *views)
    assert_one_line_error(code, err, rf"{recipe.split('/')[0]} compares views of the same image and needs at least 2 "
                          r"views per image; the views section gives 1")
    assert not (tmp_path / "runs").exists()
    code, _, err = cli(capsys, *args, *views[1:])                      # the corrected command runs
    assert code == 0, err


def test_recipe_that_is_not_yaml_is_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "train", _broken_yaml(tmp_path), f"train.out={tmp_path / 'runs'}")
    assert_one_line_error(code, err, r"recipe\.yaml is not valid YAML")
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_missing_cuda_device_is_one_line(tmp_path, base, capsys):
    blobs, _ = base
    code, _, err = cli(capsys, *run_args(blobs, tmp_path / "runs", "t", "train.device=cuda"))
    assert_one_line_error(code, err, r"train\.device asks for cuda, but no CUDA device is available")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- bad inputs: runs


def _other_architecture(tmp_path: Path, run: Path, blobs: Path) -> str:
    other = load_config(RECIPE, [*TINY, f"data.root={blobs}", f"train.out={tmp_path / 'other'}", "name=o",
                                 "model.width=0.125", "train.max_steps=1"])
    train(other, progress_bar=False)
    shutil.copy(checkpoint_paths(other.run_dir)[-1], run / "checkpoints" / "step_0000009.pt")
    return r"checkpoint .*step_0000009\.pt does not fit this model"


def _code_in_checkpoint(tmp_path: Path, run: Path, blobs: Path) -> str:
    state = load_checkpoint(checkpoint_paths(run)[-1])
    state["step"], state["payload"] = 9, _Exploit(tmp_path / "pwned")
    torch.save(state, run / "checkpoints" / "step_0000009.pt")
    return r"checkpoint .*step_0000009\.pt cannot be loaded safely"


def _cut_checkpoint(tmp_path: Path, run: Path, blobs: Path) -> str:
    data = checkpoint_paths(run)[-1].read_bytes()
    (run / "checkpoints" / "step_0000009.pt").write_bytes(data[: len(data) // 3])
    return r"checkpoint .*step_0000009\.pt: it is damaged"


def _other_config(tmp_path: Path, run: Path, blobs: Path) -> str:
    return r"cannot resume .*: its config differs in optim\.lr \(0\.3 -> 0\.1\)"


def _only_checkpoint_cut(tmp_path: Path, run: Path, blobs: Path) -> str:
    only = checkpoint_paths(run)[-1]
    only.write_bytes(only.read_bytes()[:1000])
    return (r"no intact checkpoint in .*checkpoints: step_0000003\.pt is damaged \(PytorchStreamReader failed "
            r"reading zip archive: failed finding central directory\)$")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("make", [_other_config, _other_architecture, _code_in_checkpoint, _only_checkpoint_cut],
                         ids=["another config", "another architecture", "pickled code",
                              "the only checkpoint truncated"])
def test_bad_resume_is_one_line_and_the_run_directory_survives(tmp_path, base, capsys, make):
    blobs, _ = base
    run = fresh_run(blobs, tmp_path / "runs")
    pattern = make(tmp_path, run, blobs)
    before = tree_bytes(run)
    extra = ["optim.lr=0.1"] if make is _other_config else []
    code, _, err = cli(capsys, *run_args(blobs, run.parent, "base", *extra), "--resume")
    assert_one_line_error(code, err, pattern)
    assert tree_bytes(run) == before
    assert not (tmp_path / "pwned").exists()


def test_eval_on_a_dataset_of_other_channels_names_the_tensor_that_does_not_fit(tmp_path, base, capsys):
    """A run trained on 1-channel images evaluated on an RGB dataset: the message used to end at
    'Error(s) in loading state_dict for EmpSSL:'; it now names the first tensor and both shapes."""
    from onepoch.data.prepared import SourceData, SplitArrays, write_prepared

    blobs, run = base
    rng = np.random.default_rng(0)

    def split(n):
        return SplitArrays(rng.integers(0, 255, (n, 12, 12, 3)).astype(np.uint8), rng.integers(0, 4, n))

    rgb = write_prepared(SourceData("rgb", {"train": split(16), "test": split(8)}, list("abcd"), "generated", {}),
                         tmp_path / "rgb")
    before = tree_bytes(run)
    code, _, err = cli(capsys, "eval", run, f"data.root={rgb}", "--probe", "knn")
    assert_one_line_error(code, err, r"step_0000003\.pt does not fit this model: size mismatch for "
                          r"backbone\.conv1\.weight: copying a param with shape torch\.Size\(\[\d+, 1, 3, 3\]\) "
                          r"from checkpoint, the shape in current model is torch\.Size\(\[\d+, 3, 3, 3\]\)")
    assert tree_bytes(run) == before


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_eval_refuses_a_checkpoint_with_code(tmp_path, base, capsys):
    blobs, template = base
    run = tmp_path / "run"
    shutil.copytree(template, run)  # eval reads the run's own config.yaml: a copy is a run
    pattern = _code_in_checkpoint(tmp_path, run, blobs)
    before = tree_bytes(run)
    code, _, err = cli(capsys, "eval", run, "--probe", "knn", "--features", "full")
    assert_one_line_error(code, err, pattern)
    assert tree_bytes(run) == before and not (tmp_path / "pwned").exists()


def test_eval_refuses_a_checkpoint_of_another_architecture(tmp_path, base, capsys):
    blobs, template = base
    run = tmp_path / "run"
    shutil.copytree(template, run)  # eval reads the run's own config.yaml: a copy is a run
    pattern = _other_architecture(tmp_path, run, blobs)
    before = tree_bytes(run)
    code, _, err = cli(capsys, "eval", run, "--probe", "knn", "--features", "full")
    assert_one_line_error(code, err, pattern)
    assert tree_bytes(run) == before


def test_a_damaged_test_split_stops_eval_before_it_writes(tmp_path, capsys):
    """Issue 29: `onepoch eval` (like train's online probe) refused a test split with a flipped byte only
    when... never: it evaluated on it without a word. Now it stops naming the file; eval.json is untouched."""
    root = make_blobs(tmp_path / "blobs")
    run = fresh_run(root, tmp_path / "runs")
    before = tree_bytes(run)
    pattern = _flip_test_image_byte(root)
    code, _, err = cli(capsys, "eval", run, "--probe", "knn")
    assert_one_line_error(code, err, pattern)
    assert tree_bytes(run) == before


def test_a_corrupted_encoded_test_split_stops_training_before_the_run_starts(tmp_path, capsys):
    """Issue 29: a byte changed in test/encoded.bin of a JPEG-at-rest dataset was found only after
    training ('image 0: cannot decode'); now train stops first, naming the split's file."""
    from test_encoded import jpeg_records, prepare

    root = prepare(tmp_path / "ds", jpeg_records(8, 0, 40, 60), jpeg_records(4, 1, 40, 60))
    blob = root / "test" / "encoded.bin"
    raw = bytearray(blob.read_bytes())
    raw[:64] = bytes(64)                                       # the JPEG headers of the first image
    blob.write_bytes(bytes(raw))
    code, _, err = cli(capsys, "train", "emp_ssl/imagenet100_1epoch", "model.arch=resnet10", "model.width=0.0625",
                       "method.pre_feature=32", "method.projector=32-16", "views.count=2", "views.size=16",
                       "data.batch_size=4", "train.threads=1", f"data.root={root}", f"train.out={tmp_path / 'runs'}",
                       "name=t", "train.max_steps=1")
    assert_one_line_error(code, err, r"test/encoded\.bin: checksum does not match meta\.json")
    assert not (tmp_path / "runs").exists()


def test_verifying_a_large_split_reads_a_bounded_sample_when_its_stamp_holds(tmp_path, monkeypatch):
    """A split file larger than FULL_HASH_BYTES with its recorded size and modification time is checked
    by a sampled hash; a changed time means a full re-hash; a changed size is refused at once."""
    from onepoch.data import checksum
    from onepoch.data.prepared import open_split
    from onepoch.errors import DataError

    monkeypatch.setattr(checksum, "FULL_HASH_BYTES", 0)          # every file counts as large
    monkeypatch.setattr(checksum, "SAMPLE_BLOCK_BYTES", 64)      # 64 blocks of 64 bytes of 9,344
    root = make_blobs(tmp_path / "blobs", n_train=64)
    path = root / "train" / "images.npy"
    size = path.stat().st_size
    assert size == 128 + 64 * 12 * 12                            # npy header + 64 images of 12x12
    offsets = checksum.sample_offsets(size)
    assert offsets[0] == 0 and offsets[-1] == size - 64 and len(offsets) == 64
    meta_stamp = json.loads((root / "train" / "meta.json").read_text())["stamps"]["images.npy"]
    assert meta_stamp["bytes"] == size

    def flip(at: int, keep_time: bool) -> None:
        st = path.stat()
        data = bytearray(path.read_bytes())
        data[at] ^= 0x01
        path.write_bytes(bytes(data))
        if keep_time:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    open_split(root, "train", verify=True)
    unsampled = next(i for i in range(128, size) if not any(o <= i < o + 64 for o in offsets))
    flip(unsampled, keep_time=True)         # outside every sampled block, time kept: the bound's blind spot
    open_split(root, "train", verify=True)
    flip(unsampled, keep_time=False)        # back to the old bytes, but the time changed: full hash, intact
    open_split(root, "train", verify=True)
    flip(offsets[10] + 5, keep_time=False)  # a new time: the full hash finds it
    with pytest.raises(DataError, match=r"train/images\.npy: checksum does not match meta\.json"):
        open_split(root, "train", verify=True)
    flip(offsets[10] + 5, keep_time=True)   # restored...
    json_meta = json.loads((root / "train" / "meta.json").read_text())
    json_meta["stamps"]["images.npy"]["mtime_ns"] = path.stat().st_mtime_ns
    (root / "train" / "meta.json").write_text(json.dumps(json_meta))
    open_split(root, "train", verify=True)
    flip(offsets[10] + 5, keep_time=True)   # inside a sampled block, time kept: the sample finds it
    with pytest.raises(DataError, match=r"train/images\.npy: checksum does not match meta\.json"):
        open_split(root, "train", verify=True)
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match=rf"train/images\.npy: {size + 1} bytes, meta\.json recorded {size}"):
        open_split(root, "train", verify=True)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("command", ["eval", "export", "report", "resume"])
def test_a_truncated_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, base, capsys, command):
    """Issue 29: with an intact step_3 beside a truncated step_9, eval, export, report and --resume
    stopped with a message cut mid-sentence. Now they use step 3 and say, on one warning line, which
    file they skipped and why."""
    blobs, _ = base
    run = fresh_run(blobs, tmp_path / "runs")
    pattern = _cut_checkpoint(tmp_path, run, blobs)
    cut = run / "checkpoints" / "step_0000009.pt"
    damaged = cut.read_bytes()
    argv = {"eval": ["eval", run, "--probe", "knn", "--features", "full"],
            "export": ["export", run, "--format", "safetensors", "--out", tmp_path / "b.safetensors"],
            "report": ["report", run],
            "resume": [*run_args(blobs, run.parent, "base", "train.max_steps=4"), "--resume"]}[command]
    if command == "export":
        pytest.importorskip("safetensors")
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("onepoch: warning:")]
    assert len(warnings) == 1, err
    assert re.search(rf"onepoch: warning: skipped {pattern} \(PytorchStreamReader failed reading zip archive: "
                     r"failed finding central directory\); using step_0000003\.pt \(step 3\), the newest intact "
                     r"checkpoint" + (r"; renamed it to step_0000009\.pt\.damaged$" if command == "resume" else "$"),
                     warnings[0]), warnings[0]
    if command == "eval":
        assert json.loads((run / "eval.json").read_text())["checkpoint"] == "step_0000003.pt"
    elif command == "export":
        from safetensors import safe_open

        with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
            assert f.metadata()["onepoch.step"] == "3"
    elif command == "report":
        assert "newest checkpoint: step_0000003.pt" in (run / "report.md").read_text()
    else:
        assert "trained to step 4" in out                                # the damaged file is kept, set aside
        assert (run / "checkpoints" / "step_0000009.pt.damaged").read_bytes() == damaged
        assert [p.name for p in checkpoint_paths(run)] == ["step_0000003.pt", "step_0000004.pt"]
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    if command != "resume":
        assert cut.read_bytes() == damaged                               # nothing deletes the evidence


def test_an_error_during_training_is_not_drawn_over_by_the_progress_bar(tmp_path, base, capsys, monkeypatch):
    """Issue 29: the error line was appended to the bar's line, then the bar, closed later, redrew
    itself over it. The bar is now closed (ending its line) before the error is printed."""
    import gc

    import onepoch.progress

    class Immediate(onepoch.progress.tqdm):                 # drawn at once, every update
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "delay": 0, "mininterval": 0})

    monkeypatch.setenv("ONEPOCH_PROGRESS", "1")
    monkeypatch.setattr(onepoch.progress, "tqdm", Immediate)
    real, calls = emp.emp_ssl_loss, {"n": 0}

    def flaky(z, **kw):
        loss, parts = real(z, **kw)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] == 5 else (loss, parts)

    monkeypatch.setattr(emp, "emp_ssl_loss", flaky)
    blobs, _ = base
    code = main([str(a) for a in run_args(blobs, tmp_path, "t")])
    gc.collect()                                            # a bar left open would redraw itself now
    err = capsys.readouterr().err
    assert code == 2
    assert "train t:" in err                                # the bar was drawn
    pieces = [p for p in re.split(r"[\r\n]", err) if p.strip()]
    assert pieces[-1].startswith("onepoch: error: loss is nan at step 5"), pieces[-3:]
    assert re.search(r"\nonepoch: error: ", err)            # at the start of a line


def test_resuming_a_finished_run_reports_it_without_running_the_probe_again(tmp_path, base, capsys, monkeypatch):
    """Issue 29: `--resume` of a finished run printed `final loss nan` and tested the online probe again.
    Now it says the run is already trained, gives the last logged loss and the stored probe accuracy,
    and leaves the run directory byte-identical."""
    blobs, _ = base
    code, out, err = cli(capsys, *run_args(blobs, tmp_path, "t"))                # 8 steps, to the end
    assert code == 0 and "trained to step 8" in out, err
    run = tmp_path / "t"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    probe = json.loads((run / "online_probe.json").read_text())["test_acc"]
    before = tree_bytes(run)

    def no_probe_test(*a, **k):
        raise AssertionError("the online probe was tested again")

    monkeypatch.setattr(onepoch.train, "online_probe_accuracy", no_probe_test)
    code, out, err = cli(capsys, *run_args(blobs, tmp_path, "t"), "--resume")
    assert code == 0, err
    assert "nan" not in out and last["step"] == 8
    assert re.search(rf"run {re.escape(str(run))} is already trained to step 8 \(nothing to do\); final loss "
                     rf"{last['loss']:.4f}\n", out), out
    assert f"online linear probe: {100 * probe:.2f} %" in out
    assert tree_bytes(run) == before


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_staging_directory_left_by_a_killed_prepare_is_removed_by_the_next(tmp_path, capsys):
    """Issue 29: SIGKILL during `prepare` left `.OUT.XXXX.partial` (85 MB for Imagenette) that no later run
    removed. Staging names now hold HOST-PID; the next prepare of the same --out removes those of dead
    processes of this host, and keeps a live process's and another host's."""
    import socket

    from test_source_folder import make_folder

    host, parent = socket.gethostname(), tmp_path / "data"
    dead, live = _dead_pid(), os.getpid()
    leftovers = {name: parent / name for name in (
        f".pets.{host}-{dead}.k2j4_x9a.partial", f".pets.old-{host}-{dead}",         # a killed run's
        f".pets.{host}-{live}.abcd1234.partial", f".pets.otherhost-{dead}.abcd1234.partial",  # kept
        f".pets.x8d7k2m1.partial", f".other.{host}-{dead}.abcd1234.partial")}
    for path in leftovers.values():
        (path / "train").mkdir(parents=True)
        (path / "train" / "encoded.bin").write_bytes(b"\0" * 1000)
    root = make_folder(tmp_path / "src")
    code, _, err = cli(capsys, "prepare", "folder", "--source", root, "--out", parent / "pets", "--size", "8")
    assert code == 0, err
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith(".")) == sorted([
        f".pets.{host}-{live}.abcd1234.partial", f".pets.otherhost-{dead}.abcd1234.partial",
        ".pets.x8d7k2m1.partial", f".other.{host}-{dead}.abcd1234.partial"])
    assert err.count("onepoch: warning: removed") == 2 and "left by an earlier prepare that was killed" in err


@pytest.mark.slow
def test_sigkill_during_a_jpeg_prepare_leaves_nothing_after_the_next_prepare(tmp_path):
    """The real thing: `prepare folder --layout jpeg` is killed while its staging directory fills; the next
    prepare removes it and publishes the dataset."""
    from test_encoded import encode, photo

    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(150):
            (tmp_path / "src" / f"k{c}").mkdir(parents=True, exist_ok=True)
            (tmp_path / "src" / f"k{c}" / f"{i}.png").write_bytes(encode(photo(rng, 160, 160), "PNG"))
    out = tmp_path / "data" / "pets"
    cmd = [sys.executable, "-m", "onepoch", "prepare", "folder", "--source", str(tmp_path / "src"), "--out", str(out),
           "--layout", "jpeg"]
    env = {**os.environ, "ONEPOCH_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(out.parent.glob(".pets.*.partial/train/encoded.bin")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.parent.glob(".pets.*.partial")) and not out.exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "removed" in done.stderr and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert (out / "dataset.json").exists()
