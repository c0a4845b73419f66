"""How often a 2-process torchrun launch ends with a rank aborted at exit.

The abort: after its work was done, a rank now and then died at interpreter exit with ``terminate called
without an active exception`` (SIGABRT, exit -6): gloo's worker thread, releasing the last collective, took the
GIL while the interpreter finalized, and CPython ended that thread with pthread_exit, whose unwinding met a
noexcept frame (docs/reliability.md). A torchrun worker of
onepoch now ends with ``os._exit`` once its output is flushed (``onepoch.distributed.exit_process``).
This script launches N uninterrupted 2-process runs, one after the other, and counts the launches in
which a rank aborted (exit -6 or 134, or ``terminate called`` in the output) or that failed otherwise:
one line per failed launch, then ``aborted A of N launches (exit path: ...)``. Exit status 0 when no
launch failed, 1 otherwise.

    .venv/bin/python scripts/torchrun_abort_rate.py --workload train --exit-path os_exit --launches 100
    .venv/bin/python scripts/torchrun_abort_rate.py --workload train --exit-path teardown --launches 100
    .venv/bin/python scripts/torchrun_abort_rate.py --workload collectives --exit-path teardown --launches 60

Workloads: ``train`` is ``onepoch train`` of the tiny EMP-SSL run of tests/test_distributed.py (a
generated 100-image dataset, 20 steps, checkpoints every 4) under ``torch.distributed.run --standalone
--nproc_per_node=2``, the command ``onepoch train --nproc 2`` runs; ``collectives`` is a worker that
joins a gloo group with ``onepoch.distributed.start``, runs a few all_reduce calls and leaves it with
``onepoch.distributed.stop`` (a few seconds a launch).

``--backtraces DIR`` compiles scripts/sigabrt_backtrace.c (needs a C compiler) and preloads it into every
process: an aborting thread writes its native backtrace to DIR/<pid>-<tid>.txt (read it with ``c++filt``),
and each aborted launch's line names its files. That is how the abort was found (docs/reliability.md).

Exit paths: ``os_exit`` is today's (``python -m onepoch``; the collectives worker calls
``exit_process(0)``). ``teardown`` is the one before the fix: the worker is a file holding the old
``onepoch/__main__.py``, ``raise SystemExit(main())`` (the collectives worker ends with
``raise SystemExit(0)``), so the interpreter exits normally and finalizes. Nothing in the
library is switched; everything else is the same code.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_train import make_blobs  # noqa: E402  (the generated dataset the tests train on)

# The uninterrupted run of tests/test_distributed.py::test_a_killed_rank_is_restarted_and_the_run_resumes
TRAIN = ["emp_ssl/fashion_mnist_demo", "model.arch=resnet10", "model.width=0.125", "views.size=8", "views.count=4",
         "method.pre_feature=32", "method.projector=32-16", "data.batch_size=20", "train.epochs=4",
         "train.threads=1", "train.checkpoint_every=4", "train.keep_checkpoints=10", "train.log_every=1",
         "eval.batch_size=20"]
OLD_MAIN = "from onepoch.cli import main\n\nraise SystemExit(main())\n"  # onepoch/__main__.py before the fix
COLLECTIVES = """\
import torch
from onepoch import distributed

world = distributed.launched_world()
distributed.start(world, "gloo", "cpu")
x = torch.arange(1000, dtype=torch.float32)
for _ in range(5):
    distributed.mean_over_ranks(x)
distributed.stop()
{exit}
"""
EXITS = {"os_exit": "distributed.exit_process(0)", "teardown": "raise SystemExit(0)"}
ERROR = re.compile(r"(onepoch: error|[\w.]*(Error|Exception)\b)")  # a rank's last word
FAILURE = re.compile(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)")


def verdict(returncode: int, stderr: str) -> str | None:
    """None for a clean launch, else what went wrong (``aborted: ...`` for the abort)."""
    ranks = {int(r): int(code) for r, code in FAILURE.findall(stderr)}
    aborted = sorted(r for r, code in ranks.items() if code in (-6, 134))
    if aborted or returncode in (-6, 134) or "terminate called" in stderr:
        where = f"rank {', '.join(map(str, aborted))}" if aborted else "a process"
        return f"aborted: {where} exit -6 (SIGABRT), torchrun exit {returncode}"
    if returncode != 0:
        said = [line for line in stderr.splitlines() if ERROR.match(line) and "ChildFailedError" not in line]
        said = said or ["(no error line; run the command by hand)"]
        return f"failed: torchrun exit {returncode}, rank exits {ranks or '?'}: {said[-1][:200]}"
    return None


def backtrace_environment(directory: Path) -> dict[str, str]:
    """LD_PRELOAD and ABRT_DIR for scripts/sigabrt_backtrace.c, compiled into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise SystemExit("torchrun_abort_rate.py: error: --backtraces needs a C compiler (cc, or set CC)")
    library = directory.resolve() / "sigabrt_backtrace.so"
    source = Path(__file__).with_name("sigabrt_backtrace.c")
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(library), str(source)], check=True)
    return {"LD_PRELOAD": str(library), "ABRT_DIR": str(directory.resolve())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", type=int, default=100, metavar="N", help="launches, one after the other (100)")
    p.add_argument("--workload", choices=["train", "collectives"], default="train")
    p.add_argument("--exit-path", choices=list(EXITS), default="os_exit",
                   help="os_exit: today's; teardown: the normal interpreter exit before the fix")
    p.add_argument("--timeout", type=float, default=600, help="seconds a launch may take (600)")
    p.add_argument("--backtraces", type=Path, metavar="DIR",
                   help="write the native backtrace of every aborting thread into DIR (compiles a small C helper)")
    args = p.parse_args()
    env = {**os.environ, "ONEPOCH_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    if args.backtraces:
        env.update(backtrace_environment(args.backtraces))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--max-restarts=0"]
    aborted = failed = 0
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="abort_rate_") as tmp:
        tmp = Path(tmp)
        if args.workload == "collectives":
            (tmp / "worker.py").write_text(COLLECTIVES.format(exit=EXITS[args.exit_path]))
            command = [*torchrun, str(tmp / "worker.py")]
        else:
            (tmp / "old_main.py").write_text(OLD_MAIN)
            worker = ["-m", "onepoch"] if args.exit_path == "os_exit" else [str(tmp / "old_main.py")]
            command = [*torchrun, *worker, "train", *TRAIN, f"data.root={make_blobs(tmp / 'blobs', n_train=100, n_test=20)}",
                       f"train.out={tmp / 'runs'}", "name=run"]
        seen = set(args.backtraces.glob("*.txt")) if args.backtraces else set()
        for i in range(1, args.launches + 1):
            proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)  # its own group: a hung launch is killed whole
            try:
                _, err = proc.communicate(timeout=args.timeout)
                problem = verdict(proc.returncode, err)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                problem = f"failed: timed out after {args.timeout:.0f} s"
            shutil.rmtree(tmp / "runs", ignore_errors=True)
            if problem and args.backtraces:
                stacks = sorted(set(args.backtraces.glob("*.txt")) - seen)
                seen.update(stacks)
                problem += f"; backtraces: {', '.join(map(str, stacks)) or 'none written'}"
            if problem:
                aborted += problem.startswith("aborted")
                failed += not problem.startswith("aborted")
                print(f"launch {i}: {problem}", flush=True)
    print(f"aborted {aborted} of {args.launches} launches (exit path: {args.exit_path}; workload: {args.workload}; "
          f"{failed} failed otherwise; {time.time() - start:.0f} s)", flush=True)
    return 0 if aborted == failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
