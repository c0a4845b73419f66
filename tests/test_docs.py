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
                                      "regenerate it with onepoch.recipe_table.with_table")


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
