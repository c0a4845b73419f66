"""The table of shipped recipes (``onepoch recipes``, and the README's copy between the markers below).

Each recipe file holds an ``about`` mapping beside its config (dropped by the config loader,
:func:`onepoch.runconfig.read_recipe`)::

    about:
      hardware: 2-core CPU                  # what the recipe is sized for
      reproduces: "paper: ... 84.2 %"       # a paper's row, or "our choice: ..."
      measured: false                       # or "no: why", or {result: "61.53 % linear (full), ...", command: "onepoch ..."}

The table gives, per recipe: its name, method, dataset, hardware, what it reproduces and whether it was
measured (the result and the command that measured it), read from the files alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onepoch.errors import ConfigError
from onepoch.runconfig import ABOUT_KEY, RECIPES_DIR, read_recipe

ABOUT_FIELDS = ("hardware", "reproduces", "measured")
BEGIN = "<!-- recipe table: generated from the recipes' `about` entries by `onepoch recipes`; a test keeps it so -->"
END = "<!-- end of the recipe table -->"
COLUMNS = ("recipe", "method", "dataset", "sized for", "reproduces", "measured")


def recipe_names() -> list[str]:
    """The shipped recipes: run recipes (``onepoch train NAME``), then comparisons (``compare/NAME``)."""
    paths = sorted(RECIPES_DIR.rglob("*.yaml"), key=lambda p: (p.parent.name == "compare", str(p)))
    return [str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in paths]


def recipe_about(name: str) -> dict[str, Any]:
    """The checked ``about`` mapping of a recipe (each of :data:`ABOUT_FIELDS`; ``measured`` false or a
    mapping with a ``result`` and the ``command`` that measured it)."""
    about = read_recipe(name, with_about=True).get(ABOUT_KEY)
    where = f"recipe {name}: {ABOUT_KEY}"
    if not isinstance(about, dict):
        raise ConfigError(f"{where} must be a mapping with the keys {', '.join(ABOUT_FIELDS)}")
    if sorted(about) != sorted(ABOUT_FIELDS):
        raise ConfigError(f"{where} has the keys {sorted(about)}; expected {', '.join(ABOUT_FIELDS)}")
    for key in ("hardware", "reproduces"):
        if not isinstance(about[key], str) or not about[key].strip():
            raise ConfigError(f"{where}.{key} must be a non-empty string")
    measured = about["measured"]
    if measured is not False and not (isinstance(measured, str) and measured.startswith("no")) and not (
            isinstance(measured, dict) and sorted(measured) == ["command", "result"]
            and all(isinstance(v, str) and v.strip() for v in measured.values())):
        raise ConfigError(f"{where}.measured must be false, a text that starts with 'no' (not measured, and why), "
                          "or a mapping with a result and the command that measured it")
    return about


def _dataset(data: dict[str, Any]) -> str:
    section = data.get("data") or {}
    dataset = Path(str(section.get("root", "?"))).name
    split = section.get("train_split")
    return f"{dataset} ({split})" if split and split != "train" else dataset


def _method(data: dict[str, Any], name: str) -> str:
    if name.startswith("compare/"):
        methods = []
        for entry in data.get("methods") or []:
            recipe = entry["recipe"] if isinstance(entry, dict) else entry
            methods.append(str((read_recipe(recipe).get("method") or {}).get("name", "emp_ssl")))
        return "compare: " + ", ".join(dict.fromkeys(methods))
    return str((data.get("method") or {}).get("name", "emp_ssl"))


def recipe_rows() -> list[dict[str, str]]:
    """One row per shipped recipe, the cells of :data:`COLUMNS` as text."""
    rows = []
    for name in recipe_names():
        data, about = read_recipe(name), recipe_about(name)
        measured = about["measured"]
        rows.append({"recipe": name, "method": _method(data, name), "dataset": _dataset(data),
                     "sized for": about["hardware"], "reproduces": about["reproduces"],
                     "measured": "no" if measured is False else measured if isinstance(measured, str)
                     else f"{measured['result']}: `{measured['command']}`"})
    return rows


def markdown_table() -> str:
    """The recipe table as Markdown, every cell whole."""
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(f"`{row[c]}`" if c == "recipe" else row[c]) for c in COLUMNS) + " |"
              for row in recipe_rows()]
    return "\n".join(lines) + "\n"


def readme_copy(text: str) -> str | None:
    """The table between :data:`BEGIN` and :data:`END` in ``text`` (None when the markers are missing)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(BEGIN):end].strip("\n") + "\n"


def with_table(text: str) -> str:
    """``text`` (the README) with the generated table between the markers."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError("the recipe table markers are missing")
    return text[:start + len(BEGIN)] + "\n" + markdown_table() + text[end:]


if __name__ == "__main__":  # python -m onepoch.recipe_table README.md: rewrite the README's copy of the table
    import sys

    for name in sys.argv[1:] or ["README.md"]:
        path = Path(name)
        path.write_text(with_table(path.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"{path}: recipe table rewritten")
