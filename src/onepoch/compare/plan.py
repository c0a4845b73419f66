"""A comparison's plan: the compare recipe (:class:`CompareConfig`, read by :func:`load_compare_config`),
its methods entries with their labels, budgets and published numbers, the eval protocol every cell shares,
and the cells (method x budget x seed) with the overrides each is trained and evaluated with."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onepoch.config import dataclass_from_dict, suggest
from onepoch.errors import ConfigError
from onepoch.runconfig import EvalConfig, apply_overrides, read_recipe

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
    protocol = asdict(dataclass_from_dict(EvalConfig, config.eval, where="eval"))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in protocol.items()}


def cell_overrides(config: CompareConfig, entry: MethodEntry, seed: int, run_dir: Path) -> list[str]:
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
                                  cell_overrides(config, entry, seed, run_dir)))
    return cells
