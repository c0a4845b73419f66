"""Mutation check for the evaluation: does the test suite catch deliberate evaluation bugs?

Each mutation below is one small edit of the source (an exact piece of text replaced by another) that
makes the evaluation wrong in a way a user would not notice from the numbers alone: the linear probe
choosing the worst validation setting, the final refit ignoring the chosen setting, a bag mixing
images, a changed default, a changed paper preset... For each, this script copies ``src/`` and
``tests/`` into a temporary directory, applies the edit there (never to the working tree), runs the
evaluation's tests against the copy and reports ``caught`` (some test failed), ``MISSED`` (all passed)
or ``n/a`` (the text to replace is no longer in the source: the mutation needs rewriting for the
current code). An unmutated copy is run first and must pass, or nothing is reported.

    .venv/bin/python scripts/eval_mutations.py                 # every mutation
    .venv/bin/python scripts/eval_mutations.py linear_worst knn_tie_break
    .venv/bin/python scripts/eval_mutations.py --list
    .venv/bin/python scripts/eval_mutations.py --json out.json

Exit status: 0 when every applicable mutation is caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the tests that should catch an evaluation bug; files that do not exist are skipped
TESTS = ("tests/test_probes.py", "tests/test_eval.py", "tests/test_evaluation_fidelity.py",
         "tests/test_paper_protocol.py", "tests/test_views.py")


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str  # relative to the repository root
    old: str
    new: str
    count: int = 1  # how many occurrences of ``old`` are replaced (from the first)


PROBES = "src/onepoch/probes.py"
EVAL = "src/onepoch/eval.py"
RUNCONFIG = "src/onepoch/runconfig.py"
SPEC = "src/onepoch/views/spec.py"

MUTATIONS = (
    Mutation("linear_worst", "the linear probe chooses the worst validation setting", PROBES,
             'best = min(grid, key=lambda g: (-g["val_acc"], g["epochs"], -g["weight_decay"]))',
             'best = min(grid, key=lambda g: (g["val_acc"], g["epochs"], -g["weight_decay"]))'),
    Mutation("linear_refit_ignores_choice", "the linear probe's final refit ignores the chosen setting", PROBES,
             'weight_decays=[best["weight_decay"]],\n                          epochs=best["epochs"]',
             'weight_decays=[wds[0]],\n                          epochs=eps[-1]'),
    Mutation("linear_stats_with_val", "the linear probe standardises with the validation rows included", PROBES,
             "_standardised_copy(train_x, order, tr.shape[0], x)",
             "_standardised_copy(train_x, order, order.shape[0], x)"),
    Mutation("mlp_worst", "the MLP probe chooses the worst validation setting", PROBES,
             'best = min(grid, key=lambda g: (-g["val_acc"], g["epochs"], g["hidden"]',
             'best = min(grid, key=lambda g: (g["val_acc"], g["epochs"], g["hidden"]'),
    Mutation("knn_tie_break", "the k-NN sweep's tie-break reversed (larger k, smaller T)", PROBES,
             'best = min(grid, key=lambda g: (-g["val_acc"], g["k"], -g["temperature"]))',
             'best = min(grid, key=lambda g: (-g["val_acc"], -g["k"], g["temperature"]))'),
    Mutation("knn_val_sees_val", "k-NN validation rows may be each other's neighbours", PROBES,
             "val_pred = _knn_from_bank(bank, y, bank, va, exclude=va,",
             "val_pred = _knn_from_bank(bank, y, bank, va, exclude=va[:1],"),
    Mutation("bag_patches_ignored", "eval.bag_patches ignored (the training view count used)", EVAL,
             "spec_k = spec if kind != \"bag\" else _with_count(spec, ec.bag_patches)",
             "spec_k = spec"),
    Mutation("bag_mixes_images", "a bag averages views of other images", EVAL,
             ".float().unflatten(0, (-1, b)).sum(0)",
             ".float().unflatten(0, (b, -1)).sum(1)"),
    Mutation("bag_wrong_mean", "a bag divides by the views of one pass, not all views", EVAL,
             "return total / spec.count",
             "return total / min(spec.count, views_per_pass)"),
    Mutation("grid_mixes_images", "grid features mix images (patch-major rows read as image-major)", EVAL,
             "return f.permute(1, 0, 2).reshape(x.shape[0], -1)",
             "return f.reshape(x.shape[0], -1)"),
    Mutation("default_knn_temperature", "the default k-NN temperatures changed", RUNCONFIG,
             "knn_temperature: float | tuple[float, ...] = (0.04, 0.07, 0.1)",
             "knn_temperature: float | tuple[float, ...] = (0.05, 0.07, 0.1)"),
    Mutation("default_knn_k", "the default k-NN k sweep changed", RUNCONFIG,
             "knn_k: int | tuple[int, ...] = (10, 20, 50)",
             "knn_k: int | tuple[int, ...] = (10, 20, 200)"),
    Mutation("default_val_fraction", "the default validation fraction changed", RUNCONFIG,
             "    val_fraction: float = 0.1\n", "    val_fraction: float = 0.2\n"),
    Mutation("preset_colour", "emp_ssl_cifar's hue changed", SPEC,
             "saturation=0.4, hue=0.2,\n        grayscale_p=0.2, blur_p=0.1, blur_sigma=(0.1, 2.0), solarize_p=0.1,\n    ),\n"
             "    # EMP-SSL's ImageNet",
             "saturation=0.4, hue=0.1,\n        grayscale_p=0.2, blur_p=0.1, blur_sigma=(0.1, 2.0), solarize_p=0.1,\n    ),\n"
             "    # EMP-SSL's ImageNet"),
    Mutation("preset_blur", "emp_ssl_cifar's blur probability changed", SPEC,
             "grayscale_p=0.2, blur_p=0.1, blur_sigma=(0.1, 2.0), solarize_p=0.1,\n    ),\n    # EMP-SSL's ImageNet",
             "grayscale_p=0.2, blur_p=0.0, blur_sigma=(0.1, 2.0), solarize_p=0.1,\n    ),\n    # EMP-SSL's ImageNet"),
    Mutation("preset_solarize", "emp_ssl_cifar's solarize probability changed", SPEC,
             "grayscale_p=0.2, blur_p=0.1, blur_sigma=(0.1, 2.0), solarize_p=0.1,\n    ),\n    # EMP-SSL's ImageNet",
             "grayscale_p=0.2, blur_p=0.1, blur_sigma=(0.1, 2.0), solarize_p=0.0,\n    ),\n    # EMP-SSL's ImageNet"),
)


def _copy_tree(dest: Path) -> None:
    for name in ("src", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _run_tests(tree: Path, tests: list[str], timeout: float) -> tuple[bool, str, float]:
    """(passed, last lines of pytest's output, seconds) for ``tests`` run against the copy ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timed out", time.perf_counter() - t0
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.returncode == 0, tail, time.perf_counter() - t0


def _check_copy_is_imported(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run([sys.executable, "-c", "import onepoch; print(onepoch.__file__)"], cwd=tree, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the copy's onepoch is not the one imported ({out}); cannot run mutations")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:<28} {m.what}")
        return 0
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations: {', '.join(sorted(unknown))}")
    tests = [t for t in TESTS if (ROOT / t).exists()]
    results = []
    with tempfile.TemporaryDirectory(prefix="eval-mutations-") as tmp:
        pristine = Path(tmp) / "pristine"
        _copy_tree(pristine)
        _check_copy_is_imported(pristine)
        ok, tail, seconds = _run_tests(pristine, tests, args.timeout)
        print(f"{'(unmutated)':<28} {'passes' if ok else 'FAILS'}  {seconds:5.0f} s", flush=True)
        if not ok:
            print(tail)
            return 2
        for m in chosen:
            tree = Path(tmp) / m.name
            shutil.copytree(pristine, tree)
            target = tree / m.path
            text = target.read_text()
            if text.count(m.old) < m.count:
                status, tail, seconds = "n/a", "text not found", 0.0
            else:
                target.write_text(text.replace(m.old, m.new, m.count))
                passed, tail, seconds = _run_tests(tree, tests, args.timeout)
                status = "MISSED" if passed else "caught"
            shutil.rmtree(tree)
            results.append({"name": m.name, "what": m.what, "status": status, "seconds": round(seconds, 1)})
            print(f"{m.name:<28} {status:<7} {seconds:5.0f} s  {m.what}", flush=True)
    missed = [r["name"] for r in results if r["status"] == "MISSED"]
    print(f"\n{sum(r['status'] == 'caught' for r in results)} caught, {len(missed)} missed"
          f"{': ' + ', '.join(missed) if missed else ''}, {sum(r['status'] == 'n/a' for r in results)} n/a "
          f"(tests: {' '.join(tests)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"tests": tests, "results": results}, indent=2) + "\n")
    return 1 if missed or any(r["status"] == "n/a" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
