"""A comparison's figures (matplotlib): the primary (feature, probe) test accuracy against epochs,
training seconds and patch passes, one line per method with error bars of one standard deviation over
seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onepoch.compare.plan import CompareConfig
from onepoch.compare.tables import PROBE_NAMES, mean_std, metric_pairs, metric_value
from onepoch.plots import line_panels_figure, save_figure

PLOT_AXES = {"epochs": ("acc_vs_epochs", "epochs"), "train_seconds": ("acc_vs_seconds", "training time (s)"),
             "patch_passes": ("acc_vs_patch_passes", "patch passes (views through the backbone per image)")}


def primary_metric(config: CompareConfig, summaries: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The (feature, probe) the plots show: ``primary`` of the recipe, else the first pair found."""
    pairs = metric_pairs(summaries)
    if not pairs:
        return None
    return config.primary.get("feature", pairs[0][0]), config.primary.get("probe", pairs[0][1])


def accuracy_series(summaries: list[dict[str, Any]], feature: str, probe: str, axis: str
                    ) -> list[tuple[str, list[float], list[float], list[float]]]:
    """Per trained method, ``(label, xs, ys, errs)``: one point per budget with x the mean of the cells'
    ``axis`` value (epochs, train_seconds or patch_passes) over seeds, y the mean test accuracy (%) of
    ``probe`` on ``feature`` and err its sample standard deviation (0 for one seed)."""
    trained = [s for s in summaries if s["method"] != "random_init"]
    series = []
    for label in dict.fromkeys(s["label"] for s in trained):
        points = []
        for budget in sorted({s["budget"] for s in trained if s["label"] == label}):
            cs = [s for s in trained if s["label"] == label and s["budget"] == budget]
            ys = [y for y in (metric_value(c, feature, probe) for c in cs) if y is not None]
            if ys:
                mean, std = mean_std(ys)
                points.append((sum(c[axis] for c in cs) / len(cs), mean, std))
        if points:
            xs, ys, errs = zip(*points)
            series.append((label, list(xs), list(ys), list(errs)))
    return series


def accuracy_figures(config: CompareConfig, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """``{file stem: matplotlib figure}``: the primary metric against epochs, training seconds and patch
    passes, one line per method with ± one standard deviation over seeds as error bars."""
    metric = primary_metric(config, summaries)
    if metric is None:
        return {}
    feature, probe = metric
    figures = {}
    for axis, (stem, xlabel) in PLOT_AXES.items():
        panel = {"series": accuracy_series(summaries, feature, probe, axis), "xlabel": xlabel,
                 "ylabel": "test accuracy (%)", "legend": True,
                 "title": f"{config.name}: {PROBE_NAMES[probe]} probe on {feature} features"}
        figures[stem] = line_panels_figure([panel], panel_size=(7.0, 4.5))
    return figures


def write_plots(config: CompareConfig, summaries: list[dict[str, Any]], fmt: str = "png") -> list[Path]:
    """Write :func:`accuracy_figures` into the comparison's directory (``fmt``: png, svg or pdf)."""
    return [save_figure(fig, config.dir / f"{stem}.{fmt}") for stem, fig in accuracy_figures(config, summaries).items()]
