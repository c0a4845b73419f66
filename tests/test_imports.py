"""The package's layers, read from its source with ``ast``: no import circle between onepoch modules;
evaluation, reports and exports never import the training loop; the training loop (and everything it
imports) never imports reporting or comparing.

Every import counts, module-level and function-local alike. ``from onepoch.x import y`` is an arrow to
``onepoch.x.y`` when that is a module, else to ``onepoch.x``. Arrows to the root package ``onepoch`` are
left out: every module is inside it, and it imports its API lazily, on first use."""

from __future__ import annotations

import ast
from pathlib import Path

import onepoch

ROOT = "onepoch"
# module -> modules it must not reach through any chain of imports
FORBIDDEN = {
    "onepoch.eval": ("onepoch.train",),
    "onepoch.report": ("onepoch.train",),
    "onepoch.export": ("onepoch.train",),
    "onepoch.train": ("onepoch.report", "onepoch.compare"),
}


def module_names(package_dir: Path, package: str = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under ``package_dir``."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join([package, *parts])] = path
    return names


def imported_modules(source: str, module: str, modules: set[str], *, is_package: bool = False) -> set[str]:
    """The modules of ``modules`` that ``source`` (the text of ``module``) imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return {name for name in found if name in modules and name not in (module, ROOT)}


def import_graph(package_dir: Path, package: str = ROOT) -> dict[str, set[str]]:
    """``{module: the onepoch modules it imports}`` for the package in ``package_dir``."""
    files = module_names(package_dir, package)
    return {name: imported_modules(path.read_text(encoding="utf-8"), name, set(files),
                                   is_package=path.name == "__init__.py")
            for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (``[a, b, ..., a]``) for every group of modules that import each other (Tarjan's
    strongly connected components; a module importing itself counts)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle_in(graph, set(group)) for group in groups]


def _circle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest circle through the first module of ``group`` (breadth first, inside the group)."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ())):
            if w == start:
                return paths[v] + [start]
            if w in group and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no circle through {start}")


def import_path(graph: dict[str, set[str]], source: str, target: str) -> list[str] | None:
    """A chain of imports from ``source`` to ``target`` or to a module inside it (``target.*``), or None."""
    paths = {source: [source]}
    queue = [source]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ())):
            if w in paths:
                continue
            paths[w] = paths[v] + [w]
            if w == target or w.startswith(target + "."):
                return paths[w]
            queue.append(w)
    return None


def forbidden_arrows(graph: dict[str, set[str]], rules: dict[str, tuple[str, ...]] = FORBIDDEN) -> list[list[str]]:
    """Every chain of imports that a rule of ``rules`` forbids."""
    found = []
    for source, targets in rules.items():
        for target in targets:
            path = import_path(graph, source, target)
            if path is not None:
                found.append(path)
    return found


# --------------------------------------------------------------------------------------------------


def test_no_import_circle_and_no_forbidden_arrow():
    graph = import_graph(Path(onepoch.__file__).parent)
    assert {"onepoch.train", "onepoch.eval", "onepoch.run", "onepoch.report"} <= set(graph)
    assert "onepoch.run" in graph["onepoch.train"] and "onepoch.run" in graph["onepoch.eval"]
    cycles = find_cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
    arrows = forbidden_arrows(graph)
    assert not arrows, "forbidden imports: " + "; ".join(" -> ".join(a) for a in arrows)


def test_the_checks_find_a_circle_and_a_forbidden_arrow():
    graph = {"onepoch.a": {"onepoch.b"}, "onepoch.b": {"onepoch.c"}, "onepoch.c": {"onepoch.a"},
             "onepoch.d": {"onepoch.d"}, "onepoch.e": {"onepoch.a"}}
    assert sorted(find_cycles(graph)) == [["onepoch.a", "onepoch.b", "onepoch.c", "onepoch.a"],
                                          ["onepoch.d", "onepoch.d"]]
    assert find_cycles({"onepoch.a": {"onepoch.b"}, "onepoch.b": set()}) == []
    graph = {"onepoch.eval": {"onepoch.run"}, "onepoch.run": {"onepoch.train"}, "onepoch.train": {"onepoch.views"},
             "onepoch.views": {"onepoch.compare.tables"}, "onepoch.report": set(), "onepoch.export": set()}
    assert forbidden_arrows(graph) == [["onepoch.eval", "onepoch.run", "onepoch.train"],
                                       ["onepoch.train", "onepoch.views", "onepoch.compare.tables"]]


def test_imports_are_read_everywhere_in_a_file(tmp_path):
    package = tmp_path / "onepoch"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__", "a", "b", "c", "d", "sub/__init__", "sub/e"):
        (package / f"{name}.py").write_text("")
    (package / "a.py").write_text(
        "import os\n"
        "from onepoch import b, __version__\n"        # a module, and a name of the root package
        "def f():\n"
        "    from onepoch.sub.e import g\n"           # function-local
        "    import onepoch.c\n"
        "class K:\n"
        "    def m(self):\n"
        "        from . import d\n")                   # relative
    (package / "sub" / "e.py").write_text("from .. import a\nfrom onepoch.sub import e\n")
    graph = import_graph(package)
    assert graph["onepoch.a"] == {"onepoch.b", "onepoch.c", "onepoch.d", "onepoch.sub.e"}
    assert graph["onepoch.sub.e"] == {"onepoch.a"}
    assert find_cycles(graph) == [["onepoch.a", "onepoch.sub.e", "onepoch.a"]]
