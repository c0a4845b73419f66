"""CPU seconds per training step of a recipe, as docs/cifar10_cpu.md measures it: the process CPU time of an
in-process training run of 12 steps minus that of a run of 2 steps, divided by 10 (the difference leaves out
the set-up, the first steps' warm-up and the end), with one torch thread. CPU time rather than wall time,
because on a shared machine wall time counts the other jobs too (contention still inflates it).

    python scripts/cpu_step_time.py base.yaml                        # a recipe file or a shipped name
    python scripts/cpu_step_time.py base.yaml model.arch=resnet18    # with overrides
"""

from __future__ import annotations

import argparse
import tempfile
import time

from onepoch.runconfig import load_config
from onepoch.train import train


def cpu_seconds(recipe: str, overrides: list[str], steps: int, out: str) -> float:
    config = load_config(recipe, [*overrides, "train.threads=1", f"train.max_steps={steps}", f"train.out={out}",
                                  f"name=steps{steps}", f"train.checkpoint_every={steps}"])
    start = time.process_time()
    train(config, progress_bar=False)
    return time.process_time() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        short = cpu_seconds(args.recipe, args.overrides, 2, out)
        long = cpu_seconds(args.recipe, args.overrides, 12, out)
    print(f"{(long - short) / 10:.3f} CPU s/step ({args.recipe} {' '.join(args.overrides)})")


if __name__ == "__main__":
    main()
