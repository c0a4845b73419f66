"""Benchmark: time per training step with N processes (torchrun + DDP) against one process.

The reference is measured in the same run, on the same generated data and recipe: one process with
N threads against N processes of one thread each (gloo on a CPU, NCCL with one GPU each on CUDA),
the same global batch. Time per step is the median gap between consecutive metrics lines after
the first ``--skip`` steps (start-up and first-step allocations excluded). On a CPU the processes
share the cores, so N processes are not faster: the ratio shows what the gathers, all-reduces and
synchronised BatchNorm cost.

    python benchmarks/distributed_step.py                       # EMP-SSL demo recipe, 2 processes
    python benchmarks/distributed_step.py --method simclr       # another method's Fashion-MNIST recipe
    python benchmarks/distributed_step.py --smoke               # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from onepoch.data import SourceData, SplitArrays, write_prepared
from onepoch.run import read_metrics

RECIPES = {"emp_ssl": "emp_ssl/fashion_mnist_demo"}


def generated_dataset(root: Path, n: int, size: int = 28, seed: int = 0) -> Path:
    """Grey images with a bright square at one of 4 places (its class), ``n`` train and 100 test."""
    rng = np.random.default_rng(seed)

    def split(count):
        labels = rng.integers(0, 4, count)
        images = rng.integers(0, 60, (count, size, size, 1)).astype(np.uint8)
        half = size // 2
        for i, c in enumerate(labels):
            y, x = divmod(int(c), 2)
            images[i, y * half:(y + 1) * half, x * half:(x + 1) * half] = 220
        return SplitArrays(images, labels)

    data = SourceData("squares", {"train": split(n), "test": split(100)}, ["a", "b", "c", "d"], "generated",
                      {"name": "squares", "seed": seed})
    return write_prepared(data, root)


def step_seconds(run: Path, skip: int) -> float:
    times = [row["time"] for row in read_metrics(run)]
    gaps = [b - a for a, b in zip(times[skip:], times[skip + 1:])]
    return statistics.median(gaps)


def train(recipe: str, overrides: list[str], nproc: int, threads: int) -> None:
    env = {**os.environ, "ONEPOCH_PROGRESS": "0", "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "onepoch", "train", recipe, *overrides, f"train.threads={threads}"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:   # the child's own error, not only its exit status
        raise SystemExit(f"{' '.join(command)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="emp_ssl")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the median (default 5)")
    ap.add_argument("--smoke", action="store_true", help="a tiny network, 6 steps: checks that it runs")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the recipe")
    args = ap.parse_args(argv)
    recipe = RECIPES.get(args.method, f"{args.method}/fashion_mnist_1epoch")
    steps, skip = (6, 2) if args.smoke else (args.steps, args.skip)
    batch = 16 if args.smoke else 100
    with tempfile.TemporaryDirectory() as tmp:
        root = generated_dataset(Path(tmp) / "data", batch * steps)
        common = [f"data.root={root}", f"train.out={tmp}/runs", f"data.batch_size={batch}", "train.epochs=1",
                  "train.log_every=1", "train.checkpoint_every=100000", "train.online_probe=false"]
        if args.smoke:
            common += ["model.width=0.125", "views.size=8"] + (["views.count=4"] if args.method == "emp_ssl" else [])
        common += args.overrides
        train(recipe, [*common, "name=one"], 1, args.nproc)
        train(recipe, [*common, "name=many"], args.nproc, 1)
        one, many = step_seconds(Path(tmp) / "runs/one", skip), step_seconds(Path(tmp) / "runs/many", skip)
    result = {"recipe": recipe, "overrides": common[6:], "nproc": args.nproc, "global_batch": batch,
              "seconds_per_step_one_process": one, "seconds_per_step_processes": many, "ratio": many / one}
    print(f"{recipe}, global batch {batch}, {steps} steps (median after {skip}):")
    print(f"  1 process, {args.nproc} threads (reference)  {1e3 * one:8.1f} ms/step")
    print(f"  {args.nproc} processes, 1 thread each      {1e3 * many:8.1f} ms/step   {many / one:.2f}x the time")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
