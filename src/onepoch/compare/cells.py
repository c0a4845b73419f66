"""Running a comparison's cells: each trained (or resumed from its run directory) with
:func:`onepoch.train.train` and evaluated with :func:`onepoch.eval.evaluate_run` under a lock
(:mod:`onepoch.compare.lock`); the random-init baseline; the calibration that turns a ``seconds`` budget
into epochs; and :func:`run_compare`, which runs every cell not yet done and rewrites the tables and
figures after each."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

import onepoch.train as trainer  # cells call trainer.train, looked up at each call (a test may replace it)
from onepoch.atomic import atomic_write_text
from onepoch.compare.figures import write_plots
from onepoch.compare.lock import cell_lock, describe_owner
from onepoch.compare.plan import Cell, CompareConfig, cell_overrides, eval_protocol, method_entries, plan_cells
from onepoch.compare.tables import format_markdown, write_report
from onepoch.data.prepared import open_split
from onepoch.eval import evaluate_model, evaluate_run
from onepoch.run import (
    build_model,
    open_eval_splits,
    pick_device,
    read_online_probe,
    seconds_per_patch,
    train_seconds,
    view_spec_for,
)
from onepoch.runconfig import load_config, views_per_image


def _steps_per_epoch(run_config) -> int:
    split = open_split(Path(run_config.data.root), run_config.data.train_split)
    n = split.num_images if run_config.data.limit is None else min(split.num_images, run_config.data.limit)
    return max(1, n // run_config.data.batch_size)


def _calibrate(config: CompareConfig, cell: Cell, log) -> float:
    """Seconds per step of a cell's method, measured once per method and kept in calibration.json."""
    path = config.dir / "calibration.json"
    # Under a lock shared by the processes running this comparison: two writing the file at once would
    # lose one's entry, and a cell resumed later would get other epochs from a second calibration.
    with cell_lock(config.dir / "locks" / "calibration.lock", wait=True):
        known = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if cell.label in known:
            return float(known[cell.label]["seconds_per_step"])
        return _run_calibration(config, cell, path, known, log)


def _run_calibration(config: CompareConfig, cell: Cell, path: Path, known: dict[str, Any], log) -> float:
    """Measure ``cell``'s method's seconds per step and add it to ``path`` (calibration.json, holding ``known``)."""
    scratch = config.dir / "_calibration"
    shutil.rmtree(scratch / cell.label, ignore_errors=True)
    run_config = load_config(cell.recipe, [*cell.overrides, f"train.out={scratch}", f"name={cell.label}",
                                           f"train.max_steps={config.calibration_steps}"])
    log(f"calibrating {cell.label}: {config.calibration_steps} steps to measure the time per step")
    trainer.train(run_config, progress_bar=False)
    per_patch = seconds_per_patch(run_config.run_dir)
    seconds = per_patch * run_config.data.batch_size * views_per_image(run_config.views)
    shutil.rmtree(scratch / cell.label, ignore_errors=True)
    known[cell.label] = {"seconds_per_step": seconds, "steps": config.calibration_steps}
    atomic_write_text(path, json.dumps(known, indent=2) + "\n")
    return seconds


def cell_epochs(config: CompareConfig, cell: Cell, log=print) -> float:
    """The ``train.epochs`` that gives ``cell`` its budget."""
    if config.budget == "epochs":
        return cell.budget
    run_config = load_config(cell.recipe, cell.overrides)
    if config.budget == "patch_passes":
        return cell.budget / views_per_image(run_config.views)
    return cell.budget / (_calibrate(config, cell, log) * _steps_per_epoch(run_config))


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_cell(config: CompareConfig, cell: Cell, log=print) -> dict[str, Any]:
    """Train (or resume) and evaluate one cell; return its summary (also in ``cell.json``)."""
    done = cell.run_dir / "cell.json"
    protocol = eval_protocol(config)
    finished = _finished(done, protocol)
    if finished is not None:
        return finished
    if done.exists():
        log(f"{cell.key}: the eval protocol changed since it was evaluated; evaluating it again")
    epochs = cell_epochs(config, cell, log)
    run_config = load_config(cell.recipe, [*cell.overrides, f"train.epochs={epochs!r}"])
    resume = (cell.run_dir / "config.yaml").exists()
    log(f"{'resuming' if resume else 'training'} {cell.key}: {run_config.method['name']}, "
        f"{epochs:.4g} epoch(s), seed {cell.seed}")
    result = trainer.train(run_config, resume=resume)
    eval_start = time.perf_counter()
    report = evaluate_run(cell.run_dir, overrides={f"eval.{k}": v for k, v in protocol.items()}, log=log)
    views = views_per_image(run_config.views)
    online = read_online_probe(cell.run_dir)
    steps_per_epoch = _steps_per_epoch(run_config)
    summary = {
        "label": cell.label, "recipe": cell.recipe, "method": run_config.method["name"],
        "budget_kind": config.budget, "budget": cell.budget, "seed": cell.seed, "run_dir": str(cell.run_dir),
        "epochs": result.steps / steps_per_epoch, "steps": result.steps,
        "patch_passes": result.steps / steps_per_epoch * views,
        "train_seconds": train_seconds(cell.run_dir, run_config.data.batch_size * views),
        "eval_seconds": time.perf_counter() - eval_start, "peak_rss_mb": peak_rss_mb(),
        "online_probe_test_acc": online, "results": report["evaluated"], "eval": protocol,
    }
    atomic_write_text(done, json.dumps(summary, indent=2) + "\n")
    return summary


def run_random_init(config: CompareConfig, seed: int, log=print) -> dict[str, Any]:
    """Evaluate the first method's network at its random initialisation (seed ``seed``)."""
    run_dir = config.dir / f"random_init_seed{seed}"
    done = run_dir / "cell.json"
    protocol = eval_protocol(config)
    finished = _finished(done, protocol)
    if finished is not None:
        return finished
    entry = method_entries(config)[0]
    run_config = load_config(entry.recipe, cell_overrides(config, entry, seed, run_dir))
    device = pick_device(run_config.train.device)
    train_split, test_split = open_eval_splits(run_config)
    spec = view_spec_for(run_config, train_split.mean, train_split.std)
    log(f"evaluating the random-init network ({run_config.model.arch}, width {run_config.model.width}, seed {seed})")
    eval_start = time.perf_counter()
    torch.manual_seed(run_config.seed)
    model = build_model(run_config, train_split.shape[-1]).to(device)
    results = evaluate_model(model, run_config, device=device, train_split=train_split, test_split=test_split,
                             spec=spec, log=log)
    summary = {"label": "random init", "recipe": entry.recipe, "method": "random_init", "budget_kind": config.budget,
               "budget": 0.0, "seed": seed, "run_dir": str(run_dir), "epochs": 0.0, "steps": 0, "patch_passes": 0.0,
               "train_seconds": 0.0, "eval_seconds": time.perf_counter() - eval_start, "peak_rss_mb": peak_rss_mb(),
               "online_probe_test_acc": None, "results": results, "eval": protocol}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(done, json.dumps(summary, indent=2) + "\n")
    return summary


def _finished(done: Path, protocol: dict[str, Any]) -> dict[str, Any] | None:
    """The summary in ``done`` (a cell.json) if it exists and was evaluated under ``protocol``."""
    if not done.exists():
        return None
    summary = json.loads(done.read_text(encoding="utf-8"))
    return summary if summary.get("eval") == protocol else None


def _with_finished(jobs: list, summaries: list[dict[str, Any] | None],
                   protocol: dict[str, Any]) -> list[dict[str, Any] | None]:
    """Per job, the summary of the cell this process ran, else of the cell finished on disk (by another
    process, or in an earlier sitting), else None."""
    return [summaries[i] if summaries[i] is not None else _finished(done, protocol)
            for i, (_, done, _) in enumerate(jobs)]


def run_compare(config: CompareConfig, *, command: str = "", fmt: str = "png", log=print,
                report_only: bool = False) -> dict[str, Any]:
    """Run every cell not yet done, then write compare.json, compare.md and the plots (``fmt``: png,
    svg or pdf); after each cell, the report and plots of the cells so far.

    Each cell is run under a lock (``<dir>/locks/<cell>.lock``, see ``onepoch.cell_lock``): a cell that
    another live process is running is skipped, so several processes can share one comparison (one
    per core, or per GPU). The report includes a skipped cell if it has finished by the end.
    ``report_only``: run nothing; write the report and plots of the cells finished on disk.
    """
    config.dir.mkdir(parents=True, exist_ok=True)
    cells = plan_cells(config)
    protocol = eval_protocol(config)
    jobs = [(f"random_init_seed{seed}", config.dir / f"random_init_seed{seed}" / "cell.json",
             lambda seed=seed: run_random_init(config, seed, log=log)) for seed in (config.seeds if config.random_init else ())]
    jobs += [(cell.key, cell.run_dir / "cell.json", lambda cell=cell: run_cell(config, cell, log=log)) for cell in cells]
    log(f"comparison {config.name}: {len(cells)} cell(s) ({len(method_entries(config))} method(s), their budgets, "
        f"{len(config.seeds)} seed(s)) in {config.dir}")
    t0 = time.perf_counter()
    summaries: list[dict[str, Any] | None] = [None] * len(jobs)
    for index, (key, done, run) in enumerate([] if report_only else jobs):
        with cell_lock(config.dir / "locks" / f"{key}.lock") as owner:
            if owner is not None:
                log(f"[{index + 1}/{len(jobs)}] {key}: being run by {describe_owner(owner)}; skipped")
                continue
            log(f"[{index + 1}/{len(jobs)}] {key} ({'done' if done.exists() else 'to do'})")
            summaries[index] = run()
        if index + 1 < len(jobs):  # the table and figures so far, for a comparison that spans several sittings
            so_far = [s for s in _with_finished(jobs, summaries, protocol) if s is not None]
            write_report(config, so_far, command=command, seconds=time.perf_counter() - t0)
            write_plots(config, so_far, fmt)
    summaries = _with_finished(jobs, summaries, protocol)
    missing = [key for (key, _, _), summary in zip(jobs, summaries) if summary is None]
    summaries = [s for s in summaries if s is not None]
    report = write_report(config, summaries, command=command, seconds=time.perf_counter() - t0)
    markdown = format_markdown(config, summaries, command=command)
    plots = write_plots(config, summaries, fmt)
    log("")
    log(markdown)
    log(f"wrote {config.dir / 'compare.md'}, compare.json and {len(plots)} plot(s)")
    if missing and report_only:
        log(f"{len(missing)} cell(s) not finished ({', '.join(missing)}): run the command without --report-only "
            f"to run them")
    elif missing:
        log(f"{len(missing)} cell(s) still running in other processes ({', '.join(missing)}): run the same "
            f"command again when they finish for the complete tables")
    return report
