"""``onepoch demo``: EMP-SSL for one epoch on Fashion-MNIST on the CPU, then the evaluation, next to
two baselines computed in the same run: logistic regression on raw pixels, and the same probes on
the same network left at its random initialisation; then the run's figures (``onepoch.report``:
training curves, views, PCA map of the test features)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from onepoch.atomic import atomic_write_text
from onepoch.checkpoints import latest_checkpoint
from onepoch.data.prepared import check_out_dir, write_prepared
from onepoch.data.sources import locate_source
from onepoch.eval import evaluate_model, format_table
from onepoch.feature_cache import FeatureCache, checkpoint_identity
from onepoch.report import write_figures
from onepoch.run import build_model, open_eval_splits, pick_device, read_metrics, view_spec_for
from onepoch.runconfig import load_config, read_recipe
from onepoch.train import train

DEMO_RECIPE = "emp_ssl/fashion_mnist_demo"


def ensure_fashion_mnist(root: Path, download: bool = True, log=print) -> Path:
    """Prepare Fashion-MNIST at ``root`` unless the same source is already prepared there."""
    plan = locate_source("fashion-mnist", None, download=download)
    if check_out_dir(root, plan.name, plan.request, force=False):
        return root
    t0 = time.perf_counter()
    write_prepared(plan.read(), root)
    log(f"prepared fashion-mnist -> {root} ({time.perf_counter() - t0:.1f} s)")
    return root


def free_run_name(out: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3`` ... whichever does not exist yet under ``out``."""
    candidate, i = name, 1
    while (out / candidate).exists():
        i += 1
        candidate = f"{name}-{i}"
    return candidate


def final_checkpoint_cache(run_dir: Path, step: int) -> FeatureCache | None:
    """The features cache of the run's newest checkpoint when it holds the weights of ``step`` (so that a
    later ``onepoch eval`` of the run reads the demo's features instead of embedding them again); else None."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or checkpoint.name != f"step_{step:07d}.pt":
        return None
    return FeatureCache(run_dir / "features", checkpoint_identity(checkpoint, step))


def part_timings(train_seconds: float, evaluations: dict[str, dict[str, Any]], raw_pixels: dict[str, Any],
                 figures_seconds: float) -> dict[str, float]:
    """Seconds of each part of the demo, in the order they ran: training, then for each evaluated network
    each feature's embedding (train and test splits) and each probe on it, raw pixels' probe, the figures."""
    timings = {"training": train_seconds}
    for label, results in evaluations.items():
        for kind, entry in results.items():
            if not isinstance(entry, dict) or "embed_seconds" not in entry:
                continue
            timings[f"{label} embed {kind}"] = entry["embed_seconds"]
            for probe, value in entry.items():
                if isinstance(value, dict) and "seconds" in value:
                    timings[f"{label} {kind} {probe}"] = value["seconds"]
    timings["raw pixels linear"] = raw_pixels["linear"]["seconds"]
    timings["figures"] = figures_seconds
    return timings


def run_demo(*, data_root: Path, out: Path, overrides: list[str], download: bool = True, log=print
             ) -> dict[str, Any]:
    t_start = time.perf_counter()
    ensure_fashion_mnist(data_root, download=download, log=log)
    base_name = str(read_recipe(DEMO_RECIPE).get("name", "fashion_mnist_demo"))
    name = free_run_name(out, base_name)
    config = load_config(DEMO_RECIPE, [f"data.root={data_root}", f"train.out={out}", f"name={name}", *overrides])
    log(f"EMP-SSL, 1 epoch of Fashion-MNIST: {config.model.arch} width {config.model.width}, "
        f"{config.views.get('count', '?')} patches per image, {config.data.batch_size} images per step -> {config.run_dir}")
    result = train(config)
    log(f"trained {result.steps} steps in {result.seconds:.0f} s ({result.patches_per_s:,.0f} patches/s)")
    if result.online_probe_test_acc is not None:
        log(f"online linear probe (trained during pre-training, one view per test image): "
            f"{100 * result.online_probe_test_acc:.2f} %")

    device = pick_device(config.train.device)
    train_split, test_split = open_eval_splits(config)
    spec = view_spec_for(config, train_split.mean, train_split.std)
    t0 = time.perf_counter()
    log("evaluating the trained network (and raw pixels):")
    trained = evaluate_model(result.model, config, device=device, train_split=train_split, test_split=test_split,
                             spec=spec, include_raw_pixels=True, log=log, cache=final_checkpoint_cache(config.run_dir,
                                                                                                    result.steps))
    eval_seconds = time.perf_counter() - t0
    # the baseline on the recipe's first feature only (grid for the demo's recipe): what a random network gives
    # is shown by one row, and the other features' rows would cost as much again as their trained ones
    baseline_features = tuple(config.eval.features[:1])
    log(f"evaluating the same network at its random initialisation ({', '.join(baseline_features)}):")
    torch.manual_seed(config.seed)
    untrained = build_model(config, train_split.shape[-1]).to(device)
    random_init = evaluate_model(untrained, config, device=device, train_split=train_split, test_split=test_split,
                                 spec=spec, features=baseline_features, log=log)
    t0 = time.perf_counter()
    figures = write_figures(config.run_dir, config, read_metrics(config.run_dir), train_split, test_split,
                            result.model)
    figures_seconds = time.perf_counter() - t0
    total = time.perf_counter() - t_start

    rows = [("logistic regression, raw pixels", trained.pop("raw_pixels"))]
    raw = rows[0][1]
    for kind in baseline_features:
        rows.append((f"random-init network, {kind}", random_init[kind]))
    for kind in config.eval.features:
        rows.append((f"EMP-SSL 1 epoch, {kind}", trained[kind]))
    table = format_table(rows)
    timings = part_timings(result.seconds, {"EMP-SSL": trained, "random init": random_init}, raw, figures_seconds)
    report = {
        "run": str(config.run_dir), "train_seconds": result.seconds, "patches_per_s": result.patches_per_s,
        "eval_seconds": eval_seconds, "total_seconds": total, "steps": result.steps, "timings": timings,
        "online_probe_test_acc": result.online_probe_test_acc,
        "raw_pixels": raw, "random_init": random_init, "emp_ssl": trained, "figures": [p.name for p in figures],
    }
    atomic_write_text(config.run_dir / "demo.json", json.dumps(report, indent=2) + "\n")
    log("")
    log(table)
    log("\nseconds: " + ", ".join(f"{part} {seconds:.1f}" for part, seconds in timings.items()))
    log(f"\ntotal {total / 60:.1f} min (training {result.seconds / 60:.1f} min); results in "
        f"{config.run_dir / 'demo.json'}, figures {', '.join(p.name for p in figures)} beside it")
    return report
