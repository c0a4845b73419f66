#!/usr/bin/env python3
"""The table of docs/reproducing_emp_ssl.md from the ablation's run directories (scripts/emp_ssl_ablation.sh).

Reads ``<OUT>/<cell>_seed<s>/eval.json`` and prints one Markdown row per cell: the seeds found, then each
number as the mean ± standard deviation over them (test accuracy in %), and the change of the mean against
the ``base`` cell (``sched2_w05`` against ``base_w05``). Columns: onepoch's protocol (probes chosen on a validation split) on ``grid`` and ``full``
(from ``--eval``) and on the bag of 16 patches, and EMP-SSL's official protocol on the same bag (linear probe:
its last epoch, and its best epoch chosen on the test set as the paper reports it; k-NN k = 20, T = 0.07).
A cell or number not measured yet shows ``-``.

    python scripts/emp_ssl_ablation_table.py runs/emp_ssl_ablation
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

CELLS = {
    "base": "today's recipe: cosine annealed within the epoch, fp32, the JPEG copy",
    "sched2": "cosine over 2 epochs, first epoch (the 84.2 % command's schedule)",
    "sched30": "cosine over 30 epochs, first epoch (the 80.6 % row's schedule)",
    "bf16": "bf16 autocast around the network",
    "jpeg75": "data JPEG-encoded once more, quality 75 (0.16/255 per value)",
    "jpeg95": "... quality 95 (0.83/255)",
    "jpeg55": "... quality 55 (5.8/255: a second loss as large as the first)",
    "norm05": "inputs normalised with mean 0.5, std 0.5 (the official code) instead of the data's statistics",
    "dp4": "BatchNorm over 4 pieces of the batch, as the official nn.DataParallel on 4 GPUs",
    "dp8": "... on 8 GPUs",
    "base_w05": "base at twice the width (model.width=0.5)",
    "sched2_w05": "sched2 at twice the width (against base_w05)",
}
REFERENCE = {"base": None, "base_w05": None, "sched2_w05": "base_w05"}  # what a cell's change is against; else base
# (title, feature, probe, field)
COLUMNS = [
    ("grid linear", "grid", "linear", "test_acc"),
    ("grid k-NN", "grid", "knn", "test_acc"),
    ("full linear", "full", "linear", "test_acc"),
    ("bag-16 linear", "bag", "linear", "test_acc"),
    ("bag-16 k-NN", "bag", "knn", "test_acc"),
    ("paper linear, last", "bag", "paper_linear", "test_acc"),
    ("paper linear, best* ", "bag", "paper_linear", "best_test_acc"),
    ("paper k-NN", "bag", "paper_knn", "test_acc"),
]


def read_cell(out: Path, cell: str) -> dict[int, dict]:
    """{seed: eval.json results} of the finished runs of one cell."""
    found = {}
    for run in sorted(out.glob(f"{cell}_seed*")):
        path = run / "eval.json"
        if path.is_file():
            found[int(run.name.rsplit("seed", 1)[1])] = json.loads(path.read_text())["results"]
    return found


def values(runs: dict[int, dict], feature: str, probe: str, field: str) -> list[float]:
    return [100 * r[feature][probe][field] for r in runs.values()
            if field in r.get(feature, {}).get(probe, {})]


def fmt(vals: list[float], base: list[float] | None) -> str:
    if not vals:
        return "-"
    text = f"{statistics.mean(vals):.2f}" + (f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else "")
    if base:
        text += f" ({statistics.mean(vals) - statistics.mean(base):+.2f})"
    return text


def table(out: Path) -> str:
    lines = ["| cell | what changes | seeds | " + " | ".join(c[0].strip() for c in COLUMNS) + " |",
             "|---|---|---|" + "---:|" * len(COLUMNS)]
    for cell, what in CELLS.items():
        runs = read_cell(out, cell)
        reference = REFERENCE.get(cell, "base")
        base = read_cell(out, reference) if reference else {}
        cols = [fmt(values(runs, *c[1:]), values(base, *c[1:]) if reference else None) for c in COLUMNS]
        seeds = ", ".join(map(str, sorted(runs))) or "-"
        lines.append(f"| {cell} | {what} | {seeds} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: emp_ssl_ablation_table.py OUT_DIR (the ablation's run directories)", file=sys.stderr)
        return 2
    print(table(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
