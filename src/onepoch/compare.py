"""``onepoch compare``: several methods, budgets and seeds trained and evaluated on equal terms.

A compare recipe (``configs/compare/*.yaml``)::

    name: compare_fashion_mnist_1epoch
    data: {root: data/fashion-mnist}          # data.* for every cell
    methods: [emp_ssl/fashion_mnist_demo, simclr/fashion_mnist_1epoch, ...]   # run recipes, or mappings
                                               # {recipe, label, overrides, budgets, paper}
    budget: epochs                             # epochs | patch_passes | seconds
    budgets: [1]                               # for every method without its own ``budgets``
    seeds: [0]
    eval: {features: [full, map2x2], probes: [linear, knn]}   # the protocol of every cell (other eval
                                                               # keys: EvalConfig's defaults, not the recipes')
    overrides: []                              # any other KEY=VALUE for every cell
    random_init: true                          # also evaluate the network at its initialisation
    paper_note: ''                             # where the methods' ``paper`` numbers come from

A methods entry's ``paper`` maps a budget to a published number or a short text
(``paper: {1: 28.2, 10: 56.5}``): shown beside the measured cells in compare.md's first table, for
reference only; nothing is computed from it.

Each cell (method x budget x seed) is a run directory ``<out>/<name>/<label>_<budget><value>_seed<s>``
trained with ``onepoch.train`` and evaluated with ``onepoch.eval``; its summary goes to ``cell.json``
(written last, atomically). A cell with a ``cell.json`` of the same eval protocol is reused (of
another protocol: evaluated again, not retrained); a cell with a run directory but no ``cell.json``
is resumed from its last checkpoint. So a killed compare, run again, does only the cells not yet done.
Cells run cheapest budget first (every method at the smallest budget, then the next), so a comparison
that spans several sittings has its first complete table early. Each cell runs under a lock, so
several processes started with the same command share the cells (one per core or per GPU).

Budgets: ``epochs`` sets ``train.epochs``; ``patch_passes`` P gives every method P / (views per
image) epochs (the same number of view images through the backbone; views of different sizes count
alike); ``seconds`` S gives ``S / (seconds per step x steps per epoch)`` epochs, the seconds per step
measured in a short calibration run of each method (``calibration.json``), so wall time matches
only as well as that measurement. Epochs may be fractional (``train.epochs``).

Outputs in ``<out>/<name>/``: ``compare.json`` (every cell), ``compare.md`` (tables: every method and
budget in one table with the seeds run and the ``paper`` column, then test accuracy mean ± std over seeds
per budget and per (feature, probe), train time) and figures (matplotlib, PNG) of accuracy
against epochs, training seconds and patch passes, with error bars of ± one standard deviation over seeds.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onepoch.atomic import atomic_write_text
from onepoch.cell_lock import cell_lock, describe_owner
from onepoch.config import dataclass_from_dict
from onepoch.errors import ConfigError
from onepoch.runconfig import views_per_image

BUDGET_KINDS = ("epochs", "patch_passes", "seconds")
COMPARE_KEYS = ("name", "data", "methods", "budget", "budgets", "seeds", "eval", "overrides", "random_init", "out",
                "calibration_steps", "primary", "paper_note")
METHOD_KEYS = ("recipe", "label", "overrides", "budgets", "paper")


@dataclass
class CompareConfig:
    name: str = "compare"
    data: dict[str, Any] = field(default_factory=dict)
    methods: list[Any] = field(default_factory=list)   # recipe names/paths, or {recipe, label, overrides}
    budget: str = "epochs"
    budgets: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    eval: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    random_init: bool = True
    out: str = "runs"
    calibration_steps: int = 20
    primary: dict[str, str] = field(default_factory=dict)  # {feature, probe} for the plots; default: the first ones
    paper_note: str = ""       # where the methods entries' ``paper`` numbers come from (printed under the table)

    def __post_init__(self):
        if self.budget not in BUDGET_KINDS:
            from onepoch.config import suggest

            raise ConfigError(f"unknown budget {self.budget!r}{suggest(self.budget, BUDGET_KINDS)}; "
                              f"choose one of: {', '.join(BUDGET_KINDS)}")
        if not self.methods:
            raise ConfigError("a comparison needs at least one entry in methods")
        if not self.budgets or any(not b > 0 for b in self.budgets):
            raise ConfigError(f"budgets must be a non-empty list of positive numbers, got {list(self.budgets)}")
        if not self.seeds:
            raise ConfigError("seeds must be a non-empty list")
        if self.calibration_steps < 4:
            raise ConfigError(f"calibration_steps must be >= 4, got {self.calibration_steps}")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name must be a plain directory name, got {self.name!r}")

    @property
    def dir(self) -> Path:
        return Path(self.out) / self.name


@dataclass
class MethodEntry:
    recipe: str
    label: str
    overrides: tuple[str, ...] = ()
    budgets: tuple[float, ...] | None = None   # None: the comparison's budgets
    paper: dict[float, str] = field(default_factory=dict)   # budget -> published number (text), reference only


@dataclass
class Cell:
    label: str
    recipe: str
    budget: float
    seed: int
    run_dir: Path
    overrides: list[str]

    @property
    def key(self) -> str:
        return self.run_dir.name


def load_compare_config(recipe: str | Path, overrides: list[str] = ()) -> CompareConfig:
    """A CompareConfig from a compare recipe (a path or a shipped name such as
    ``compare/fashion_mnist_1epoch``) with dotted overrides (``budgets=[1,3]``, ``data.root=...``)."""
    from onepoch.runconfig import apply_overrides, read_recipe

    data = apply_overrides(read_recipe(recipe), list(overrides), top_keys=COMPARE_KEYS)
    for key in ("data", "eval", "primary"):
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(f"{key} must be a mapping, got {data[key]!r}")
    if "methods" in data and not isinstance(data["methods"], list):
        raise ConfigError(f"methods must be a list of recipes, got {data['methods']!r}")
    config = dataclass_from_dict(CompareConfig, data, where="compare")
    method_entries(config)  # check the methods now
    return config


def method_entries(config: CompareConfig) -> list[MethodEntry]:
    """The methods with their labels: the method's name, or the recipe when two share a method."""
    from onepoch.runconfig import read_recipe

    raw = []
    for item in config.methods:
        if isinstance(item, str):
            item = {"recipe": item}
        if not isinstance(item, dict) or "recipe" not in item:
            raise ConfigError(f"each methods entry must be a recipe name or a mapping with 'recipe', got {item!r}")
        unknown = set(item) - set(METHOD_KEYS)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))} in methods entry {item!r} "
                              f"(allowed: {', '.join(METHOD_KEYS)})")
        method = (read_recipe(item["recipe"]).get("method") or {}).get("name", "emp_ssl")
        raw.append((item, method))
    counts: dict[str, int] = {}
    for _, method in raw:
        counts[method] = counts.get(method, 0) + 1
    entries = []
    for item, method in raw:
        default = method if counts[method] == 1 else str(item["recipe"]).replace("/", "-").removesuffix(".yaml")
        label = str(item.get("label") or default)
        if not label.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"method label {label!r} must be letters, digits, '-', '_' or '.'")
        entries.append(MethodEntry(str(item["recipe"]), label, tuple(item.get("overrides") or ()),
                                   _entry_budgets(item), _entry_paper(item)))
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two methods share a label: {labels}; give them distinct 'label's")
    return entries


def _entry_budgets(item: dict[str, Any]) -> tuple[float, ...] | None:
    """A methods entry's own budget list, checked like the comparison's."""
    if "budgets" not in item:
        return None
    budgets = item["budgets"]
    if (not isinstance(budgets, list) or not budgets
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0 for b in budgets)):
        raise ConfigError(f"budgets of methods entry {item['recipe']!r} must be a non-empty list of positive "
                          f"numbers, got {budgets!r}")
    return tuple(float(b) for b in budgets)


def _entry_paper(item: dict[str, Any]) -> dict[float, str]:
    """A methods entry's published numbers: ``{budget: number or text}`` as ``{float: str}``."""
    paper = item.get("paper") or {}
    if not isinstance(paper, dict):
        raise ConfigError(f"paper of methods entry {item['recipe']!r} must map budgets to numbers or text, "
                          f"e.g. {{1: 28.2, 10: 56.5}}, got {paper!r}")
    out = {}
    for budget, value in paper.items():
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ConfigError(f"paper of methods entry {item['recipe']!r}: budget {budget!r} is not a positive "
                              f"number")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or str(value).strip() == "":
            raise ConfigError(f"paper of methods entry {item['recipe']!r}: the value for budget {budget:g} must be "
                              f"a number or a text, got {value!r}")
        out[float(budget)] = str(value).replace("|", "/")
    return out


def _budget_tag(kind: str, value: float) -> str:
    text = f"{value:g}"
    return {"epochs": f"ep{text}", "patch_passes": f"pp{text}", "seconds": f"s{text}"}[kind]


def eval_protocol(config: CompareConfig) -> dict[str, Any]:
    """Every eval key, not only those the compare recipe gives: each cell gets exactly the same
    protocol, whatever its own recipe says (JSON-plain values)."""
    from onepoch.runconfig import EvalConfig

    protocol = asdict(dataclass_from_dict(EvalConfig, config.eval, where="eval"))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in protocol.items()}


def _cell_overrides(config: CompareConfig, entry: MethodEntry, seed: int, run_dir: Path) -> list[str]:
    out = [f"data.{k}={json.dumps(v)}" for k, v in config.data.items()]
    out += [f"eval.{k}={json.dumps(v)}" for k, v in eval_protocol(config).items()]
    out += [*config.overrides, *entry.overrides]
    out += [f"seed={seed}", f"name={run_dir.name}", f"train.out={run_dir.parent}"]
    return out


def plan_cells(config: CompareConfig) -> list[Cell]:
    """Every (method, budget, seed) cell, smallest budget first, then in the order of ``methods``."""
    entries = method_entries(config)
    all_budgets = sorted({float(b) for e in entries for b in (e.budgets or config.budgets)})
    cells = []
    for budget in all_budgets:
        for entry in entries:
            if budget not in (entry.budgets or tuple(float(b) for b in config.budgets)):
                continue
            for seed in config.seeds:
                run_dir = config.dir / f"{entry.label}_{_budget_tag(config.budget, budget)}_seed{seed}"
                cells.append(Cell(entry.label, entry.recipe, float(budget), int(seed), run_dir,
                                  _cell_overrides(config, entry, seed, run_dir)))
    return cells


def _steps_per_epoch(run_config) -> int:
    from onepoch.data.prepared import open_split

    split = open_split(Path(run_config.data.root), run_config.data.train_split)
    n = split.num_images if run_config.data.limit is None else min(split.num_images, run_config.data.limit)
    return max(1, n // run_config.data.batch_size)


def step_seconds(metrics_path: Path, skip: int = 3) -> float:
    """Median seconds per training step in a metrics.jsonl (the first ``skip`` steps left out)."""
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    patches = [r for r in rows if r.get("patches_per_s")]
    if not patches:
        raise ConfigError(f"{metrics_path} has no timed steps")
    return statistics.median([1.0 / r["patches_per_s"] for r in patches[skip:] or patches])


def train_seconds(metrics_path: Path, patches_per_step: int) -> float:
    """Seconds spent in training steps, summed from a run's metrics.jsonl (survives resumes)."""
    total = 0.0
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("patches_per_s"):
                total += patches_per_step / row["patches_per_s"]
    return total


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
    from onepoch.runconfig import load_config
    from onepoch.train import train

    scratch = config.dir / "_calibration"
    shutil.rmtree(scratch / cell.label, ignore_errors=True)
    run_config = load_config(cell.recipe, [*cell.overrides, f"train.out={scratch}", f"name={cell.label}",
                                           f"train.max_steps={config.calibration_steps}"])
    log(f"calibrating {cell.label}: {config.calibration_steps} steps to measure the time per step")
    train(run_config, progress_bar=False)
    per_patch = step_seconds(run_config.run_dir / "metrics.jsonl")
    seconds = per_patch * run_config.data.batch_size * views_per_image(run_config.views)
    shutil.rmtree(scratch / cell.label, ignore_errors=True)
    known[cell.label] = {"seconds_per_step": seconds, "steps": config.calibration_steps}
    atomic_write_text(path, json.dumps(known, indent=2) + "\n")
    return seconds


def cell_epochs(config: CompareConfig, cell: Cell, log=print) -> float:
    """The ``train.epochs`` that gives ``cell`` its budget."""
    from onepoch.runconfig import load_config

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
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_cell(config: CompareConfig, cell: Cell, log=print) -> dict[str, Any]:
    """Train (or resume) and evaluate one cell; return its summary (also in ``cell.json``)."""
    from onepoch.eval import evaluate_run
    from onepoch.runconfig import load_config
    from onepoch.train import train

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
    result = train(run_config, resume=resume)
    eval_start = time.perf_counter()
    report = evaluate_run(cell.run_dir, overrides={f"eval.{k}": v for k, v in protocol.items()}, log=log)
    views = views_per_image(run_config.views)
    online_path = cell.run_dir / "online_probe.json"
    online = json.loads(online_path.read_text(encoding="utf-8"))["test_acc"] if online_path.exists() else None
    steps_per_epoch = _steps_per_epoch(run_config)
    summary = {
        "label": cell.label, "recipe": cell.recipe, "method": run_config.method["name"],
        "budget_kind": config.budget, "budget": cell.budget, "seed": cell.seed, "run_dir": str(cell.run_dir),
        "epochs": result.steps / steps_per_epoch, "steps": result.steps,
        "patch_passes": result.steps / steps_per_epoch * views,
        "train_seconds": train_seconds(cell.run_dir / "metrics.jsonl", run_config.data.batch_size * views),
        "eval_seconds": time.perf_counter() - eval_start, "peak_rss_mb": peak_rss_mb(),
        "online_probe_test_acc": online, "results": report["results"], "eval": protocol,
    }
    atomic_write_text(done, json.dumps(summary, indent=2) + "\n")
    return summary


def run_random_init(config: CompareConfig, seed: int, log=print) -> dict[str, Any]:
    """Evaluate the first method's network at its random initialisation (seed ``seed``)."""
    import torch

    from onepoch.eval import evaluate_model, open_eval_splits
    from onepoch.runconfig import load_config
    from onepoch.train import build_model, pick_device, view_spec_for

    run_dir = config.dir / f"random_init_seed{seed}"
    done = run_dir / "cell.json"
    protocol = eval_protocol(config)
    finished = _finished(done, protocol)
    if finished is not None:
        return finished
    entry = method_entries(config)[0]
    run_config = load_config(entry.recipe, _cell_overrides(config, entry, seed, run_dir))
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


# --------------------------------------------------------------------------------------------------
# Tables and plots
# --------------------------------------------------------------------------------------------------


def _metric(summary: dict[str, Any], feature: str, probe: str) -> float | None:
    entry = summary["results"].get(feature, {}).get(probe)
    return None if entry is None else 100.0 * entry["test_acc"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def metric_pairs(summaries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(feature, probe) pairs present in the results, in their order of appearance."""
    pairs: list[tuple[str, str]] = []
    for s in summaries:
        for feature, entry in s["results"].items():
            for probe in ("linear", "mlp", "knn"):
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


PROBE_NAMES = {"linear": "linear", "mlp": "MLP", "knn": "k-NN"}


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
                   + [_fmt([_metric(c, f, p) for c in cs]) for f, p in pairs])
            if with_paper:
                row.append(paper.get(label, {}).get(budget, ""))
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if with_paper and config.paper_note:
        lines += [f"Paper: {config.paper_note}", ""]
    return lines


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
              "Test accuracy in %, mean ± std over seeds; every probe's hyper-parameters chosen on a "
              "validation split of the training set. Train time: seconds in training steps.", ""]
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
                   _fmt(online)] + [_fmt([_metric(c, f, p) for c in cs]) for f, p in pairs]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if len(budgets) > 1:
        for f, p in pairs:
            lines += [f"## {PROBE_NAMES[p]} probe on `{f}` features, by budget", ""]
            head = ["method"] + [f"{b:g}" for b in budgets] + ["train time (s) at each budget"]
            lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
            for label in labels:
                row = [label] + [_fmt([_metric(c, f, p) for c in cells_of(label, b)]) for b in budgets]
                row.append(" / ".join(_fmt([c["train_seconds"] for c in cells_of(label, b)], 0) for b in budgets))
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


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
            ys = [y for y in (_metric(c, feature, probe) for c in cs) if y is not None]
            if ys:
                mean, std = _mean_std(ys)
                points.append((sum(c[axis] for c in cs) / len(cs), mean, std))
        if points:
            xs, ys, errs = zip(*points)
            series.append((label, list(xs), list(ys), list(errs)))
    return series


def accuracy_figures(config: CompareConfig, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """``{file stem: matplotlib figure}``: the primary metric against epochs, training seconds and patch
    passes, one line per method with ± one standard deviation over seeds as error bars."""
    from onepoch.plots import line_panels_figure

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
    from onepoch.plots import save_figure

    return [save_figure(fig, config.dir / f"{stem}.{fmt}") for stem, fig in accuracy_figures(config, summaries).items()]


def write_report(config: CompareConfig, summaries: list[dict[str, Any]], *, command: str = "",
                 seconds: float = 0.0) -> dict[str, Any]:
    """compare.json and compare.md of the cells in ``summaries`` (atomically; partial while a comparison runs)."""
    report = {"config": asdict(config), "cells": summaries, "seconds": seconds,
              "complete": len(summaries) == len(plan_cells(config)) + (len(config.seeds) if config.random_init else 0)}
    atomic_write_text(config.dir / "compare.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(config.dir / "compare.md", format_markdown(config, summaries, command=command) + "\n")
    return report


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
