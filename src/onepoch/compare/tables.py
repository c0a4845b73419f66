"""A comparison's tables: ``compare.md`` (every method and budget in one table with the seeds run and
the ``paper`` column, a table per budget, method x budget tables per (feature, probe), what the cells
cost) and ``compare.json`` (every cell's summary)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from typing import Any

from onepoch.atomic import atomic_write_text
from onepoch.compare.plan import CompareConfig, method_entries, plan_cells


def metric_value(summary: dict[str, Any], feature: str, probe: str) -> float | None:
    entry = summary["results"].get(feature, {}).get(probe)
    return None if entry is None else 100.0 * entry["test_acc"]


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def metric_pairs(summaries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(feature, probe) pairs present in the results, in their order of appearance."""
    pairs: list[tuple[str, str]] = []
    for s in summaries:
        for feature, entry in s["results"].items():
            for probe in PROBE_NAMES:
                if probe in entry and (feature, probe) not in pairs:
                    pairs.append((feature, probe))
    return pairs


def cost_line(summaries: list[dict[str, Any]]) -> str:
    """What the cells so far cost: training and evaluation seconds summed, the largest peak RSS."""
    train = sum(s.get("train_seconds") or 0.0 for s in summaries)
    evaluation = [s["eval_seconds"] for s in summaries if s.get("eval_seconds") is not None]
    peaks = [s["peak_rss_mb"] for s in summaries if s.get("peak_rss_mb") is not None]
    text = f"Cost of these {len(summaries)} cell(s): {train / 3600:.2f} h in training steps"
    if evaluation:
        text += f", {sum(evaluation) / 3600:.2f} h evaluating" + (
            f" ({len(evaluation)} of {len(summaries)} cells timed)" if len(evaluation) < len(summaries) else "")
    if peaks:
        text += f"; peak resident memory {max(peaks) / 1024:.2f} GiB"
    return text + "."


PROBE_NAMES = {"linear": "linear", "mlp": "MLP", "knn": "k-NN",
               "paper_linear": "paper protocol linear, last epoch", "paper_knn": "paper protocol k-NN"}

BUDGET_HEADERS = {"epochs": "epochs", "patch_passes": "patch passes", "seconds": "seconds of training"}


def summary_table(config: CompareConfig, summaries: list[dict[str, Any]], labels: list[str],
                  pairs: list[tuple[str, str]], paper: dict[str, dict[float, str]]) -> list[str]:
    """compare.md's first table: one row per method and budget with the seeds that ran, the mean train
    time, every (feature, probe) as mean ± std over those seeds and, where ``paper`` (label -> the methods
    entry's ``paper``) gives one, the published number for that budget (the random network: one row, no budget)."""
    with_paper = any(paper.values())
    head = (["method", BUDGET_HEADERS[config.budget], "seeds", "train time (s)"]
            + [f"{PROBE_NAMES[p]} ({f})" for f, p in pairs] + (["paper"] if with_paper else []))
    lines = ["## Every method and budget", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for label in labels:
        mine = [s for s in summaries if s["label"] == label]
        random_init = mine[0]["method"] == "random_init"
        for budget in sorted({s["budget"] for s in mine}):
            cs = [s for s in mine if s["budget"] == budget]
            seeds = sorted(c["seed"] for c in cs)
            seeds_text = str(len(seeds))
            if len(seeds) < len(config.seeds):
                seeds_text += f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(str(x) for x in seeds)})"
            train = "-" if random_init else f"{sum(c['train_seconds'] for c in cs) / len(cs):.0f}"
            row = ([label, "-" if random_init else f"{budget:g}", seeds_text, train]
                   + [_fmt([metric_value(c, f, p) for c in cs]) for f, p in pairs])
            if with_paper:
                row.append(paper.get(label, {}).get(budget, ""))
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if with_paper and config.paper_note:
        lines += [f"Paper: {config.paper_note}", ""]
    return lines


def protocol_sentence(protocol: str) -> str:
    """compare.md's words on which evaluation protocol produced its numbers."""
    onepoch = "onepoch's probes, every hyper-parameter chosen on a validation split of the training set"
    paper = ("EMP-SSL's official probes on the bag (`paper_*` columns: reported only, their linear probe's last "
             "epoch)")
    text = {"onepoch": onepoch, "paper": paper, "both": f"{onepoch}; and {paper}"}[protocol]
    return f"Evaluation protocol `{protocol}`: {text}."


def format_markdown(config: CompareConfig, summaries: list[dict[str, Any]], *, command: str = "") -> str:
    """compare.md: every method and budget in one table (:func:`summary_table`), then a table per budget,
    then method x budget tables per (feature, probe)."""
    entries = method_entries(config)
    present = {s["label"] for s in summaries}
    labels = [e.label for e in entries if e.label in present]   # the recipe's order
    labels += [x for x in dict.fromkeys(s["label"] for s in summaries if s["method"] != "random_init")
               if x not in labels]
    labels += list(dict.fromkeys(s["label"] for s in summaries if s["method"] == "random_init"))
    budgets = sorted({s["budget"] for s in summaries if s["method"] != "random_init"})
    pairs = metric_pairs(summaries)
    unit = {"epochs": "epoch(s)", "patch_passes": "patch passes", "seconds": "s of training"}[config.budget]
    lines = [f"# Comparison `{config.name}`", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Data: `{config.data.get('root', '(from each recipe)')}`; budget: {config.budget} "
              f"{', '.join(f'{b:g}' for b in budgets)}; seeds: {', '.join(str(s) for s in config.seeds)}. "
              f"Test accuracy in %, mean ± std over seeds. {protocol_sentence(config.eval.get('protocol', 'onepoch'))} "
              "Train time: seconds in training steps.", ""]
    lines += [cost_line(summaries), ""]
    lines += summary_table(config, summaries, labels, pairs, {e.label: e.paper for e in entries})

    def cells_of(label: str, budget: float | None) -> list[dict[str, Any]]:
        return [s for s in summaries if s["label"] == label and (budget is None or s["budget"] == budget
                                                                  or s["method"] == "random_init")]

    for budget in budgets:
        lines += [f"## {budget:g} {unit}", ""]
        head = ["method", "epochs", "train time (s)", "online probe"] + [f"{PROBE_NAMES[p]} ({f})" for f, p in pairs]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for label in labels:
            cs = cells_of(label, budget)
            if not cs:
                continue
            online = [100 * c["online_probe_test_acc"] for c in cs if c["online_probe_test_acc"] is not None]
            row = [label, _fmt([c["epochs"] for c in cs], 3), _fmt([c["train_seconds"] for c in cs], 0),
                   _fmt(online)] + [_fmt([metric_value(c, f, p) for c in cs]) for f, p in pairs]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if len(budgets) > 1:
        for f, p in pairs:
            lines += [f"## {PROBE_NAMES[p]} probe on `{f}` features, by budget", ""]
            head = ["method"] + [f"{b:g}" for b in budgets] + ["train time (s) at each budget"]
            lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
            for label in labels:
                row = [label] + [_fmt([metric_value(c, f, p) for c in cells_of(label, b)]) for b in budgets]
                row.append(" / ".join(_fmt([c["train_seconds"] for c in cells_of(label, b)], 0) for b in budgets))
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


def write_report(config: CompareConfig, summaries: list[dict[str, Any]], *, command: str = "",
                 seconds: float = 0.0) -> dict[str, Any]:
    """compare.json and compare.md of the cells in ``summaries`` (atomically; partial while a comparison runs)."""
    report = {"config": asdict(config), "cells": summaries, "seconds": seconds,
              "complete": len(summaries) == len(plan_cells(config)) + (len(config.seeds) if config.random_init else 0)}
    atomic_write_text(config.dir / "compare.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(config.dir / "compare.md", format_markdown(config, summaries, command=command) + "\n")
    return report
