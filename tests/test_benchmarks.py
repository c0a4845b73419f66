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
