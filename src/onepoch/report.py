"""``onepoch report RUN_DIR``: a Markdown report of one run with its figures (matplotlib).

Writes into the run directory (figures as PNG, or SVG / PDF with ``fmt``):

- ``report.md``: the config in brief, training (steps, time, throughput, final loss parts), the online
  probe, the probe results of ``eval.json`` when the run was evaluated, and the figures;
- ``curves.png``: the training curves from ``metrics.jsonl`` in four panels: loss and its parts,
  learning rate, online-probe batch accuracy, patches/s (a moving average over ``smooth`` steps for
  the noisy ones);
- ``views.png``: a few training images and the views the run's recipe makes of them (every view group);
- ``embedding_pca.png``: the test images' backbone features (whole image, newest checkpoint) projected
  on their first two principal components, coloured by class.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onepoch.atomic import atomic_write_text
from onepoch.errors import ConfigError
from onepoch.eval import embed_split
from onepoch.plots import line_panels_figure, save_figure, scatter_figure
from onepoch.run import load_trained, pick_device, read_metrics, read_online_probe, train_seconds, view_spec_for
from onepoch.runconfig import views_per_image
from onepoch.views.tiles import run_view_tiles, save_views_figure

FIGURE_FORMATS = ("png", "svg", "pdf")


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average what exists)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _loss_keys(rows: list[dict[str, Any]]) -> list[str]:
    skip = {"step", "epoch", "lr", "patches_per_s", "time", "online_probe_loss", "online_probe_acc"}
    first = rows[0] if rows else {}
    keys = [k for k, v in first.items() if k not in skip and isinstance(v, (int, float))]
    # a part that is the loss itself (single-term losses) is left out
    return [k for k in keys if k == "loss" or any(r.get(k) != r.get("loss") for r in rows[:50])]


def curves_panels(rows: list[dict[str, Any]], smooth: int) -> list[dict[str, Any]]:
    """The training-curve panels of :func:`onepoch.plots.line_panels_figure` for ``metrics.jsonl``
    rows: loss and its parts, learning rate, online-probe batch accuracy, patches/s; the noisy ones
    (all but the learning rate) as trailing moving averages over ``smooth`` steps."""
    steps = [r["step"] for r in rows]

    def series(key: str, label: str | None = None, window: int = 1):
        ys = [float(r.get(key, math.nan)) for r in rows]
        return (label or key, steps, moving_average(ys, window) if window > 1 else ys)

    mean = f" ({smooth}-step mean)" if smooth > 1 else ""
    probe = any("online_probe_acc" in r for r in rows)
    return [
        {"title": f"loss and its parts{mean}", "series": [series(k, window=smooth) for k in _loss_keys(rows)]},
        {"title": "learning rate", "series": [series("lr", "learning rate")]},
        {"title": f"online probe, batch accuracy{mean}",
         "series": [series("online_probe_acc", "online probe", smooth)] if probe else []},
        {"title": f"patches (views) per second{mean}", "series": [series("patches_per_s", "patches/s", smooth)]},
    ]


def write_curves(run_dir: Path, rows: list[dict[str, Any]], smooth: int, fmt: str = "png") -> Path:
    """``curves.<fmt>``: the panels of :func:`curves_panels` in one figure."""
    panels = [{**p, "xlabel": "step"} for p in curves_panels(rows, smooth)]
    return save_figure(line_panels_figure(panels, title=f"{run_dir.name}: training"), run_dir / f"curves.{fmt}")


def write_views(run_dir: Path, config, split, fmt: str = "png") -> Path:
    """``views.<fmt>``: per row an image, then up to 4 views of each view group."""
    tiles, titles = run_view_tiles(config, split)
    return save_views_figure(run_dir / f"views.{fmt}", tiles, col_titles=titles)


def pca_2d(features: torch.Tensor) -> torch.Tensor:
    """The rows of ``features`` projected on their first two principal components (seeded)."""
    x = features.float() - features.float().mean(0, keepdim=True)
    # The two leading right singular vectors of the centred matrix, from the small D x D covariance.
    cov = x.T @ x / max(1, x.shape[0] - 1)
    _, vectors = torch.linalg.eigh(cov.double())
    top = vectors[:, -2:].flip(1).float()
    return x @ top


def write_embedding(run_dir: Path, config, model, test_split, fmt: str = "png", max_points: int = 5000) -> Path:
    """``embedding_pca.<fmt>``: the backbone features of the whole image of the first ``max_points``
    test images, projected by :func:`pca_2d`, coloured by class."""
    device = pick_device(config.train.device)
    n = min(max_points, test_split.num_images)
    spec = view_spec_for(config, test_split.mean, test_split.std)
    feats = embed_split(model.to(device), test_split.images[:n], "full", spec=spec, batch_size=config.eval.batch_size,
                        device=device, seed=config.eval.seed, progress_desc="embed test (full)")
    fig = scatter_figure(pca_2d(feats.cpu()).numpy(), np.array(test_split.labels[:n]),
                         class_names=list(test_split.class_names),
                         title=f"{run_dir.name}: test features, first two principal components",
                         xlabel="principal component 1", ylabel="principal component 2", max_points=max_points)
    return save_figure(fig, run_dir / f"embedding_pca.{fmt}")


def write_figures(run_dir: Path, config, rows: list[dict[str, Any]], train_split, test_split, model=None, *,
                  smooth: int = 20, fmt: str = "png") -> list[Path]:
    """The run's figures: training curves, views, and (given the trained ``model``) the PCA map."""
    figures = [write_curves(run_dir, rows, smooth, fmt), write_views(run_dir, config, train_split, fmt)]
    if model is not None:
        figures.append(write_embedding(run_dir, config, model, test_split, fmt))
    return figures


def _eval_lines(report: dict[str, Any]) -> list[str]:
    results = report.get("results", {})
    titles = {"linear": "linear test % (val %)", "mlp": "mlp test % (val %)", "knn": "knn test % (val %)",
              "paper_linear": "paper protocol linear: last epoch % (best epoch* %)",
              "paper_knn": "paper protocol k-NN %"}
    probes = [p for p in titles if any(p in e for e in results.values() if isinstance(e, dict))]
    lines = ["| features | " + " | ".join(titles[p] for p in probes) + " |", "|---|" + "---:|" * len(probes)]
    for kind, entry in results.items():
        cells = []
        for p in probes:
            r = entry.get(p)
            if r is None:
                cells.append("-")
            elif p == "paper_linear":
                cells.append(f"{100 * r['test_acc']:.2f} ({100 * r['best_test_acc']:.2f})")
            elif p == "paper_knn":
                cells.append(f"{100 * r['test_acc']:.2f}")
            else:
                cells.append(f"{100 * r['test_acc']:.2f} ({100 * r['val_acc']:.2f})")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    if any(p.startswith("paper_") for p in probes):
        lines += ["", "Protocols: `linear`, `mlp`, `knn` are onepoch's (every choice on a validation split); "
                  "`paper protocol` columns are EMP-SSL's official evaluation, reported only (*: its best epoch is "
                  "chosen on the test set, as the paper reports it)."]
    return lines


def write_report(run_dir: str | Path, *, smooth: int = 20, fmt: str = "png", log=print) -> Path:
    """Write ``report.md`` and the figures (``fmt``: png, svg or pdf) for the run in ``run_dir``;
    return the report's path."""
    run = load_trained(run_dir)
    run_dir, config, ckpt = run.run_dir, run.config, run.checkpoint
    rows = read_metrics(run_dir)
    if not rows:
        raise ConfigError(f"{run_dir}/metrics.jsonl holds no steps yet")
    if fmt not in FIGURE_FORMATS:
        raise ConfigError(f"figure format must be one of {', '.join(FIGURE_FORMATS)}, got {fmt!r}")
    figures = write_figures(run_dir, config, rows, run.train_split, run.test_split, run.model, smooth=smooth,
                            fmt=fmt)

    last = rows[-1]
    rates = sorted(r["patches_per_s"] for r in rows if r.get("patches_per_s"))
    patches_per_step = config.data.batch_size * views_per_image(config.views)
    lines = [f"# Run `{run_dir.name}`", "",
             f"- method: **{config.method['name']}** "
             f"({', '.join(f'{k}={v}' for k, v in config.method.items() if k != 'name')})",
             f"- model: {config.model.arch}, width {config.model.width}, {config.model.stem} stem",
             f"- data: `{config.data.root}`, {config.data.batch_size} images per step; views: "
             f"`{json.dumps(config.views)}`",
             f"- optimizer: {config.optim.name}, lr {config.optim.lr}, weight decay {config.optim.weight_decay}, "
             f"{config.train.epochs} epoch(s)",
             "", "## Training", "",
             f"- steps: {last['step']} (newest checkpoint: {ckpt.name if ckpt else 'none'})",
             f"- time in training steps: {train_seconds(run_dir, patches_per_step):.1f} s"]
    if rates:
        lines.append(f"- throughput: median {rates[len(rates) // 2]:,.0f} patches/s")
    parts = ", ".join(f"{k} {last[k]:.4g}" for k in _loss_keys(rows))
    lines.append(f"- final step: {parts}")
    acc = read_online_probe(run_dir)
    if acc is not None:
        lines.append(f"- online linear probe, test split: {100 * acc:.2f} %")
    evaluation = run_dir / "eval.json"
    if evaluation.exists():
        report = json.loads(evaluation.read_text(encoding="utf-8"))
        lines += ["", f"## Evaluation (`eval.json`, step {report.get('step')})", "", *_eval_lines(report)]
    else:
        lines += ["", "## Evaluation", "", f"Not evaluated yet: `onepoch eval {run_dir}`."]
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}]({p.name})" if fmt != "pdf" else f"- [{p.stem}]({p.name})" for p in figures]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    log(f"wrote {path} and {len(figures)} figure(s)")
    return path
