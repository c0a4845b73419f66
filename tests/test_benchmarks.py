"""Every benchmark script runs in its --smoke mode (so none of them can go stale unnoticed)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


def test_benchmarks_are_found():
    assert {p.name for p in BENCHMARKS} >= {"train_step.py", "views.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_runs_in_smoke_mode(script, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--json", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "a benchmark prints its result"
    assert out.exists() and out.stat().st_size > 0


@pytest.mark.slow
def test_train_step_breakdown_for_a_baseline(tmp_path):
    """The step benchmark works for a method with an EMA target and two view groups (BYOL)."""
    import json

    out = tmp_path / "byol.json"
    script = Path(__file__).parent.parent / "benchmarks" / "train_step.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--recipe", "byol/fashion_mnist_1epoch",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    phases = result["breakdown_s"]
    assert set(phases) == {"views", "forward", "loss", "backward", "optimizer"}
    assert all(v > 0 for v in phases.values()) and phases["loss"] < phases["forward"]
    assert result["channels_last"]["patches_per_s"] > 0 and 0 <= result["channels_last"]["host_wait_share"] <= 1


def _jpeg_npz(path: Path, n_train: int, n_test: int) -> Path:
    """A CIFAR-shaped JPEG-bytes npz (the layout of the shared cifar10-jpeg.npz) of random 32x32 images."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        blobs, offsets = [], [0]
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=75)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
            offsets.append(offsets[-1] + len(blobs[-1]))
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.asarray(offsets, np.int64)
        arrays[f"y_{split}"] = (np.arange(n) % 10).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.mark.slow
def test_gpu_check_reproduce_runs_in_smoke_mode(tmp_path):
    """benchmarks/gpu_check.sh --reproduce --smoke: both precisions trained and evaluated under both protocols,
    one GPU-CHECK line per cell with the paper protocol's best and last epoch beside onepoch's numbers."""
    import os

    root = Path(__file__).parent.parent
    env = {**os.environ, "WORK": str(tmp_path / "work"), "DATA": str(tmp_path / "cifar10"),
           "CIFAR_NPZ": str(_jpeg_npz(tmp_path / "tiny.npz", 400, 200)), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--reproduce", "--smoke"],
                          capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / "work" / "summary.txt").read_text().splitlines()
    cells = [line for line in summary if line.startswith("GPU-CHECK (r)")]
    assert [line.split()[2] for line in cells] == ["fp32:", "bf16:"], summary
    for line in cells:
        assert "exit 0" in line and "linear best epoch" in line and "last epoch" in line, line
        assert "onepoch protocol (validation-chosen): bag linear" in line, line
    config = (tmp_path / "work" / "runs" / "repro_fp32" / "config.yaml").read_text()
    assert "amp: 'off'" in config or 'amp: "off"' in config or "amp: off" in config
    bad = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--reprodce"], capture_output=True,
                         text=True, timeout=60, cwd=root, env=env)
    assert bad.returncode == 2 and "unknown argument --reprodce" in bad.stderr
