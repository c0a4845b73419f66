"""Cell locks: several `onepoch compare` processes share one comparison directory."""

import json
import os
import signal
import subprocess
import sys

import pytest
from test_compare import write_recipe

from onepoch.compare.lock import cell_lock, describe_owner
from onepoch.compare import load_compare_config

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="cells are not locked on Windows")

HOLDER = """
import sys, time
from pathlib import Path
from onepoch.compare.lock import cell_lock
with cell_lock(Path(sys.argv[1])) as owner:
    print("held" if owner is None else "busy", flush=True)
    time.sleep(120)
"""


def test_a_held_lock_names_its_owner_and_is_free_again_after_release(tmp_path):
    path = tmp_path / "locks" / "a.lock"
    with cell_lock(path) as first:
        assert first is None
        with cell_lock(path) as second:              # another open file: refused, even in this process
            assert second == {"host": second["host"], "pid": os.getpid()}
            assert describe_owner(second) == f"pid {os.getpid()} on {second['host']}"
        with cell_lock(tmp_path / "locks" / "b.lock") as other:
            assert other is None                     # locks are per cell
    with cell_lock(path) as again:
        assert again is None
    assert describe_owner({}) == "another process"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "c.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with cell_lock(path) as owner:
            assert owner["pid"] == holder.pid
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with cell_lock(path) as owner:
            assert owner is None
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_compare_skips_cells_another_process_runs_and_reports_them_when_done(tmp_path, monkeypatch):
    import onepoch.compare.cells as compare

    path = write_recipe(tmp_path, tmp_path, budgets=[1], seeds=[0], random_init=False)
    config = load_compare_config(path)
    protocol = compare.eval_protocol(config)
    keys = [cell.key for cell in compare.plan_cells(config)]
    assert keys == ["emp_ssl_ep1_seed0", "simclr_ep1_seed0"]

    def summary(key, label):
        return {"label": label, "method": label, "budget": 1.0, "seed": 0, "epochs": 1.0, "train_seconds": 10.0,
                "eval_seconds": 1.0, "peak_rss_mb": 100.0, "online_probe_test_acc": None, "patch_passes": 1.0,
                "results": {"full": {"linear": {"test_acc": 0.5}}}, "eval": protocol, "key": key}

    ran = []

    def fake_cell(config, cell, log=print):
        ran.append(cell.key)
        return summary(cell.key, cell.label)

    monkeypatch.setattr(compare, "run_cell", fake_cell)
    lines = []
    with cell_lock(config.dir / "locks" / "emp_ssl_ep1_seed0.lock"):   # "another process" runs EMP-SSL's cell
        report = compare.run_compare(config, log=lines.append)
    assert ran == ["simclr_ep1_seed0"]
    assert any("emp_ssl_ep1_seed0: being run by pid" in line and "skipped" in line for line in lines)
    assert "1 cell(s) still running in other processes (emp_ssl_ep1_seed0)" in lines[-1]
    assert not report["complete"] and [c["key"] for c in report["cells"]] == ["simclr_ep1_seed0"]

    # the other process finishes while this one runs its last cell: the report includes its cell
    def cell_while_the_other_finishes(config, cell, log=print):
        (config.dir / "emp_ssl_ep1_seed0").mkdir(exist_ok=True)
        (config.dir / "emp_ssl_ep1_seed0" / "cell.json").write_text(json.dumps(summary("emp_ssl_ep1_seed0", "emp_ssl")))
        return fake_cell(config, cell, log)

    ran.clear()
    (config.dir / "simclr_ep1_seed0").mkdir(exist_ok=True)
    monkeypatch.setattr(compare, "run_cell", cell_while_the_other_finishes)
    with cell_lock(config.dir / "locks" / "emp_ssl_ep1_seed0.lock"):
        report = compare.run_compare(config, log=lines.append)
    assert ran == ["simclr_ep1_seed0"]
    assert report["complete"] and [c["key"] for c in report["cells"]] == ["emp_ssl_ep1_seed0", "simclr_ep1_seed0"]


def test_a_calibration_waits_for_the_one_another_process_is_running(tmp_path, monkeypatch):
    import threading

    import onepoch.compare.cells as compare

    path = write_recipe(tmp_path, tmp_path, budget="seconds", budgets=[60], seeds=[0], random_init=False)
    config = load_compare_config(path)
    cell = compare.plan_cells(config)[1]
    runs = []
    monkeypatch.setattr(compare, "_run_calibration", lambda *a: runs.append(a) or 9.0)
    held, release = threading.Event(), threading.Event()

    def other_process():  # holds the calibration lock, measures the same method, writes its entry
        with cell_lock(config.dir / "locks" / "calibration.lock", wait=True):
            held.set()
            release.wait(30)
            (config.dir / "calibration.json").write_text(json.dumps({cell.label: {"seconds_per_step": 0.5}}))

    other = threading.Thread(target=other_process)
    other.start()
    assert held.wait(30)
    result = []
    mine = threading.Thread(target=lambda: result.append(compare._calibrate(config, cell, print)))
    mine.start()
    mine.join(0.5)
    assert mine.is_alive() and not result          # waiting for the lock, not measuring on its own
    release.set()
    mine.join(30)
    other.join(30)
    assert result == [0.5] and runs == []            # the other's measurement, read under the lock
    assert compare._calibrate(config, compare.plan_cells(config)[0], print) == 9.0 and len(runs) == 1
