"""scripts/torchrun_abort_rate.py, which counts the 2-process torchrun launches whose rank aborted at
exit (``terminate called without an active exception``, SIGABRT): its verdict on torchrun's report,
and a few launches of the collectives worker on today's exit path, none of which may abort."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "torchrun_abort_rate.py"
SUMMARY = re.compile(r"aborted (\d+) of (\d+) launches \(exit path: (\w+); workload: (\w+); (\d+) failed otherwise; "
                     r"\d+ s\)")


def script():
    spec = importlib.util.spec_from_file_location("torchrun_abort_rate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(rank: int, exitcode: int, signal_name: str = "") -> str:
    """The failure table torchrun prints to stderr (torch 2.x) for one failed rank."""
    return ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
            "============================================================\n"
            "worker.py FAILED\n------------------------------------------------------------\n"
            "Failures:\n  <NO_OTHER_FAILURES>\n------------------------------------------------------------\n"
            "Root Cause (first observed failure):\n[0]:\n  time      : 2025-01-01_00:00:00\n  host      : h\n"
            f"  rank      : {rank} (local_rank: {rank})\n  exitcode  : {exitcode} (pid: 123) {signal_name}\n"
            "  error_file: <N/A>\n"
            "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html\n"
            "============================================================\n")


def test_the_verdict_tells_an_abort_from_another_failure_and_from_a_clean_launch():
    verdict = script().verdict
    assert verdict(0, "") is None
    assert verdict(1, report(1, -6, "Signal 6 (SIGABRT) received by PID 123")).startswith("aborted: rank 1 exit -6")
    assert verdict(1, "terminate called without an active exception\n").startswith("aborted: a process")
    assert verdict(-6, "").startswith("aborted")
    other = verdict(1, "onepoch: error: data.root missing\n" + report(0, 2))
    assert other.startswith("failed:") and other.endswith("onepoch: error: data.root missing")


@pytest.mark.slow
def test_collectives_launches_on_todays_exit_path_do_not_abort():
    """Three 2-process launches (gloo group, all_reduce, leave, os._exit): 0 aborted, 0 failed. The
    measured rate (hundreds of launches, both exit paths, both workloads) is the script's to give."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workload", "collectives", "--launches", "3",
                           "--exit-path", "os_exit", "--timeout", "120"], capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    summary = SUMMARY.fullmatch(lines[-1]) if lines else None
    assert summary, proc.stdout + proc.stderr[-3000:]
    assert summary.groups() == ("0", "3", "os_exit", "collectives", "0"), proc.stdout  # no launch aborted or failed
    assert len(lines) == 1 and proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.skipif(__import__("shutil").which("cc") is None, reason="needs a C compiler")
def test_the_backtrace_helper_writes_the_aborting_threads_native_stack(tmp_path):
    """--backtraces: scripts/sigabrt_backtrace.c, preloaded, writes the stack of the thread that aborts (here
    Python's os.abort on the main thread, through libc's abort) and the process still ends with SIGABRT."""
    environment = script().backtrace_environment(tmp_path / "stacks")
    proc = subprocess.run([sys.executable, "-c", "import os; os.abort()"], env={**__import__("os").environ,
                          **environment}, capture_output=True, timeout=60)
    assert proc.returncode == -6
    (stack,) = (tmp_path / "stacks").glob("*.txt")
    text = stack.read_text()
    assert re.match(r"SIGABRT in process (\d+), thread \1 \(the main thread\)\n", text), text[:200]
    assert re.search(r"libc\.so\.6\(abort\+", text), text
