"""The documentation against the code: the README's recipe table is the one the recipes generate."""

from pathlib import Path

import pytest

from onepoch.cli import main
from onepoch.errors import ConfigError
from onepoch.recipe_table import markdown_table, readme_copy, recipe_about, recipe_names, recipe_rows
from onepoch.runconfig import RECIPES_DIR, load_config, read_recipe

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_readme_recipe_table_is_the_generated_one():
    copy = readme_copy(README.read_text(encoding="utf-8"))
    assert copy is not None, "README.md lacks the recipe table markers"
    assert copy == markdown_table(), ("README.md's recipe table differs from the recipes' `about` entries: "
                                      "regenerate it with python -m onepoch.recipe_table README.md")


def test_every_recipe_says_what_it_is_and_the_loader_drops_it():
    names = recipe_names()
    assert len(names) >= 50 and names[-1].startswith("compare/")
    for name in names:
        about = recipe_about(name)   # checked: hardware, reproduces, measured
        assert about["hardware"] in ("2-core CPU", "one GPU")
        assert "about" in read_recipe(name, with_about=True) and "about" not in read_recipe(name)
    load_config("emp_ssl/cifar10_cpu")   # a run recipe with an about entry still loads


def test_recipe_rows_state_the_facts():
    rows = {row["recipe"]: row for row in recipe_rows()}
    cpu = rows["emp_ssl/cifar10_cpu"]
    assert (cpu["method"], cpu["dataset"], cpu["sized for"]) == ("emp_ssl", "cifar10", "2-core CPU")
    assert cpu["measured"].startswith("61.53 ± 0.09 % linear (full)")
    assert cpu["measured"].endswith("`onepoch compare compare/cifar10_cpu data.root=data/cifar10 "
                                    "'overrides=[train.threads=1]'`")
    assert rows["emp_ssl/stl10_1epoch"]["dataset"] == "stl10 (train+unlabeled)"
    assert rows["compare/cifar10_cpu"]["method"] == "compare: emp_ssl, simclr, byol, vicreg, barlow_twins, swav, ressl"
    for name in ("emp_ssl/cifar10_1epoch", "emp_ssl/cifar100_1epoch", "emp_ssl/cifar10_1epoch_schedule30",
                 "emp_ssl/cifar100_1epoch_schedule30"):
        assert rows[name]["measured"].startswith("no: not yet on a GPU"), name
        assert rows[name]["reproduces"].startswith("paper: EMP-SSL official README"), name
    # every measured row names the command that measured it; none of the CIFAR-100 CPU recipes is measured
    for name, row in rows.items():
        assert row["measured"].startswith("no") or ": `onepoch " in row["measured"], name
        if name.endswith("cifar100_cpu"):
            assert row["measured"] == "no"


def test_recipe_comments_agree_with_the_table():
    for name in recipe_names():
        text = (RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8")
        header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        measured = recipe_about(name)["measured"]
        if isinstance(measured, dict):
            assert "NOT MEASURED" not in header.upper(), name
        if name.endswith("cifar100_cpu"):   # no CIFAR-10 title copied from the recipe it repeats
            assert "on CIFAR-10, sized" not in header and "CIFAR-10 baseline" not in header, name
    for name in ("barlow_twins/cifar10_cpu", "barlow_twins/cifar100_cpu"):
        projector = read_recipe(name)["method"]["projector"]
        assert projector == "512-128" and f"Projector {projector}" in (RECIPES_DIR / f"{name}.yaml").read_text()
    for name in ("emp_ssl/stl10_1epoch", "emp_ssl/tiny_imagenet_1epoch"):   # their own schedule, described
        assert read_recipe(name)["optim"].get("schedule_epochs") is None
        assert "cosine goes from lr .3 to 0 over this one" in (RECIPES_DIR / f"{name}.yaml").read_text(), name


def test_bad_about_entries_are_refused(tmp_path, monkeypatch):
    import onepoch.recipe_table as table

    for about, pattern in [("about: 3", "must be a mapping"),
                           ("about: {hardware: CPU, reproduces: x}", "has the keys"),
                           ("about: {hardware: CPU, reproduces: x, measured: yes}", "measured must be false"),
                           ("about: {hardware: CPU, reproduces: x, measured: {result: 1 %}}", "measured must be false")]:
        path = tmp_path / "r.yaml"
        path.write_text(f"{about}\nname: r\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=pattern):
            table.recipe_about(str(path))


def test_onepoch_recipes_prints_the_table(capsys):
    assert main(["recipes"]) == 0
    assert capsys.readouterr().out == markdown_table()


# --------------------------------------------------------------------------------------------------
# Every name a doc gives exists: files, recipes, presets, CLI flags, config keys; no machine paths, no
# issue numbers
# --------------------------------------------------------------------------------------------------

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402

from onepoch import methods  # noqa: E402
from onepoch.cli import build_parser  # noqa: E402
from onepoch.runconfig import SECTIONS  # noqa: E402
from onepoch.views import PRESETS, ViewSpec  # noqa: E402


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def subcommand_flags() -> dict[str, set[str]]:
    """``{subcommand: its option strings}`` of the onepoch command line, ``""`` for the top level."""
    parser = build_parser()
    flags = {"": {s for a in parser._actions for s in a.option_strings}}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags[name] = {s for a in sub._actions for s in a.option_strings} | flags[""]
    return flags


def config_keys() -> dict[str, set[str]]:
    keys = {section: {f.name for f in dataclasses.fields(cls)} for section, cls in SECTIONS.items()}
    keys["views"] = {f.name for f in dataclasses.fields(ViewSpec)} | {"preset", "groups"}
    keys["method"] = {"name"} | {f.name for m in methods.names() for f in dataclasses.fields(methods.get(m).config_class)}
    return keys


RECIPE_NAME = re.compile(r"(?<![\w/.<>-])((?:%s|compare)/[a-z0-9_]+)(?![\w/.-])" % "|".join(methods.names()))
REPO_PATH = re.compile(r"(?<![\w/.<>~-])((?:src|docs|benchmarks|scripts|tests|configs)/[\w./-]*\w)")
SCRIPT_NAME = re.compile(r"(?<![\w/.-])([\w-]+\.(?:py|sh))\b")
PRESET_NAME = re.compile(r"(?<![\w/.-])((?:%s)_(?:cifar|fashion_mnist|imagenet|stl10))(?![\w/.-])" % "|".join(methods.names()))
CONFIG_KEY = re.compile(r"(?<![\w./<-])(data|views|model|method|optim|train|eval)\.([a-z_][a-z0-9_]*)(?![\w(])")
ONEPOCH_COMMAND = re.compile(r"\bonepoch (prepare|views|train|eval|compare|report|demo|export|embed|recipes)\b"
                             r"([^`#\n;|&]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:root|work|home/\w+|Users/\w+)/")
HOW_WRITTEN = re.compile(r"\b(?:this session|the session that|other agents|agents')", re.IGNORECASE)
ISSUE_NUMBER = re.compile(r"\b[Ii]ssues? #?\d+|(?<![\w&/#(])#\d+\b")
FILE_EXTENSIONS = ("py", "json", "jsonl", "md", "png", "yaml", "txt", "pt", "svg", "pdf", "npy")
# named as references, not as files of this repository: the EMP-SSL official code's scripts and its main.py's option
EXTERNAL_SCRIPTS = {"main.py", "evaluate.py", "aug4img.py", "aug.py"}
EXTERNAL_FLAGS = {"--epoch"}


def repo_scripts() -> set[str]:
    return {p.name for d in ("src", "benchmarks", "scripts", "tests") for p in (ROOT / d).rglob("*")
            if p.suffix in (".py", ".sh")}


def doc_problems(path: Path, text: str) -> list[str]:
    """What ``text`` (the doc at ``path``) names that does not exist, and what it must not say."""
    recipes, presets, keys, flags = set(recipe_names()), set(PRESETS), config_keys(), subcommand_flags()
    scripts = repo_scripts()
    tool_text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for d in ("benchmarks", "scripts")
                          for p in (ROOT / d).iterdir() if p.suffix in (".py", ".sh"))
    problems = []
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        where = f"{path.relative_to(ROOT)}:{number}"
        misspelt = "did you mean" in line or (number > 1 and "did you mean" in lines[number - 2])
        for m in MACHINE_PATH.finditer(line):
            problems.append(f"{where}: a path of the machine it was written on: {line[m.start():m.end() + 20]!r}")
        for m in ISSUE_NUMBER.finditer(line):
            problems.append(f"{where}: an issue number: {m.group(0)!r}")
        for m in HOW_WRITTEN.finditer(line):
            problems.append(f"{where}: how the doc was written: {m.group(0)!r}")
        for m in RECIPE_NAME.finditer(line):
            if m.group(1) not in recipes:
                problems.append(f"{where}: no recipe {m.group(1)!r}")
        for m in REPO_PATH.finditer(line):
            rel = m.group(1).rstrip(".")
            if line[m.end():m.end() + 1] != "*" and not (ROOT / rel).exists() and not (path.parent / rel).exists():
                problems.append(f"{where}: no file {rel!r}")
        for m in SCRIPT_NAME.finditer(line):
            if m.group(1) not in scripts | EXTERNAL_SCRIPTS and not (ROOT / m.group(1)).exists():
                problems.append(f"{where}: no script {m.group(1)!r} in the repository")
        for m in PRESET_NAME.finditer(line):
            if m.group(1) not in presets:
                problems.append(f"{where}: no view preset {m.group(1)!r}")
        for m in CONFIG_KEY.finditer(line) if not misspelt else ():   # keys misspelt on purpose in an example
            section, key = m.groups()
            if key not in FILE_EXTENSIONS and key not in keys[section] and line[m.end():m.end() + 1] != "*":
                problems.append(f"{where}: no config key {section}.{key}")
        for m in ONEPOCH_COMMAND.finditer(line):
            for flag in FLAG.findall(m.group(2)):
                if flag not in flags[m.group(1)]:
                    problems.append(f"{where}: onepoch {m.group(1)} has no option {flag}")
        for span in re.findall(r"`(--[a-z][a-z0-9-]*)", line):
            if not any(span in f for f in flags.values()) and span not in tool_text and span not in EXTERNAL_FLAGS:
                problems.append(f"{where}: no option {span} in onepoch or the repository's scripts")
    return problems


def test_docs_name_only_what_exists():
    problems = [p for path in doc_files() for p in doc_problems(path, path.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line, expected", [
    ("see issue 16 for the search", "an issue number"),
    ("Issue 13's note", "an issue number"),
    ("fixed in #12.", "an issue number"),
    ("copied to /root/onepoch-work/x", "a path of the machine"),
    ("Until this session the default was 2", "how the doc was written"),
    ("run `onepoch train emp_ssl/cifar10_2epoch`", "no recipe 'emp_ssl/cifar10_2epoch'"),
    ("see `docs/nothing.md`", "no file 'docs/nothing.md'"),
    ("with `python calib2.py`", "no script 'calib2.py'"),
    ("the preset `emp_ssl_stl10`", "no view preset 'emp_ssl_stl10'"),
    ("set train.online_prob=false", "no config key train.online_prob"),
    ("`onepoch eval RUN --probes linear`", "onepoch eval has no option --probes"),
    ("pass `--unlabeled`", "no option --unlabeled"),
])
def test_the_doc_check_catches(line, expected):
    problems = doc_problems(ROOT / "README.md", line)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize("line", [
    "onepoch train emp_ssl/cifar10_cpu data.root=data/cifar10 train.threads=1 --eval",
    "see [On a GPU](#on-a-gpu-benchmarksgpu_checksh) and `configs/<method>/cifar10_cpu.yaml`",
    "`onepoch prepare folder --unlabelled --source photos/ --size 32 --out data/photos`",
    "written to `runs/emp_ssl_cifar10_1epoch/eval.json`; `model.load_state_dict(state, strict=False)`",
    "torchrun --standalone --nproc_per_node=4 -m onepoch train emp_ssl/cifar10_1epoch",
    "the presets `emp_ssl_cifar` and `simclr_cifar`; `python benchmarks/decode.py --size 96`",
])
def test_the_doc_check_passes_legitimate_text(line):
    assert doc_problems(ROOT / "README.md", line) == []
