"""`onepoch compare`: cells, budgets, tables, plots, and picking up after an interruption."""

import json
import shutil
import statistics

import pytest
import yaml
from test_train import make_blobs

import onepoch.compare.cells
import onepoch.train
from onepoch.cli import main
from onepoch.compare import (
    accuracy_figures,
    accuracy_series,
    cell_epochs,
    eval_protocol,
    format_markdown,
    load_compare_config,
    plan_cells,
)
from onepoch.errors import ConfigError

TINY_CELL = ["model.arch=resnet10", "model.width=0.0625", "views.size=8", "data.batch_size=8", "data.limit=32",
             "data.test_limit=32", "train.threads=1", "train.checkpoint_every=100", "optim.warmup_steps=0"]
TINY_EVAL = {"features": ["full", "map2x2"], "probes": ["linear", "knn"], "linear_epochs": [2],
             "linear_weight_decays": [0.0], "knn_k": [5], "knn_temperature": [0.07], "batch_size": 64}


def write_recipe(tmp_path, root, **extra):
    recipe = {
        "name": "tiny",
        "data": {"root": str(root)},
        "methods": [
            {"recipe": "emp_ssl/fashion_mnist_demo",
             "overrides": ["method.pre_feature=32", "method.projector=32-16", "views.count=4"]},
            {"recipe": "simclr/fashion_mnist_1epoch", "overrides": ["method.projector=32-16"]},
        ],
        "budget": "epochs", "budgets": [1, 2], "seeds": [0, 1],
        "eval": TINY_EVAL,
        "overrides": TINY_CELL, "random_init": True, "out": str(tmp_path / "runs"),
    }
    recipe.update(extra)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_compare_config_errors(tmp_path):
    path = write_recipe(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="unknown config key 'seedz'.*did you mean 'seeds'"):
        load_compare_config(path, ["seedz=[1]"])
    with pytest.raises(ConfigError, match="unknown budget 'epoch'.*did you mean 'epochs'"):
        load_compare_config(path, ["budget=epoch"])
    with pytest.raises(ConfigError, match="at least one entry in methods"):
        load_compare_config(path, ["methods=[]"])
    with pytest.raises(ConfigError, match="two methods share a label"):
        load_compare_config(path, ["methods=[simclr/fashion_mnist_1epoch, {recipe: vicreg/fashion_mnist_1epoch, "
                                   "label: simclr}]"])
    with pytest.raises(ConfigError, match="recipe 'simclr/nope' not found"):
        load_compare_config(path, ["methods=[simclr/nope]"])
    with pytest.raises(ConfigError, match="budgets must be a non-empty list of positive numbers"):
        load_compare_config(path, ["budgets=[0]"])
    with pytest.raises(ConfigError, match="budgets of methods entry 'simclr/fashion_mnist_1epoch' must be a non-empty"):
        load_compare_config(path, ["methods=[{recipe: simclr/fashion_mnist_1epoch, budgets: [1, -2]}]"])
    with pytest.raises(ConfigError, match="paper of methods entry 'simclr/fashion_mnist_1epoch' must map budgets"):
        load_compare_config(path, ["methods=[{recipe: simclr/fashion_mnist_1epoch, paper: 56.5}]"])
    with pytest.raises(ConfigError, match="budget 'ten' is not a positive number"):
        load_compare_config(path, ["methods=[{recipe: simclr/fashion_mnist_1epoch, paper: {ten: 56.5}}]"])
    with pytest.raises(ConfigError, match="the value for budget 10 must be a number or a text"):
        load_compare_config(path, ["methods=[{recipe: simclr/fashion_mnist_1epoch, paper: {10: [56.5]}}]"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) papr in methods entry.*allowed: .*budgets, paper"):
        load_compare_config(path, ["methods=[{recipe: simclr/fashion_mnist_1epoch, papr: {1: 2}}]"])


def test_per_method_budgets_and_cheapest_budget_first(tmp_path, monkeypatch):
    import onepoch.compare.cells as compare

    path = write_recipe(tmp_path, tmp_path, budgets=[1, 10], methods=[
        {"recipe": "emp_ssl/fashion_mnist_demo", "budgets": [1, 2, 3]}, "simclr/fashion_mnist_1epoch"])
    config = load_compare_config(path)
    assert [(c.label, c.budget, c.seed) for c in plan_cells(config)] == [
        ("emp_ssl", 1.0, 0), ("emp_ssl", 1.0, 1), ("simclr", 1.0, 0), ("simclr", 1.0, 1),
        ("emp_ssl", 2.0, 0), ("emp_ssl", 2.0, 1), ("emp_ssl", 3.0, 0), ("emp_ssl", 3.0, 1),
        ("simclr", 10.0, 0), ("simclr", 10.0, 1)]

    # The report is rewritten after every cell: a comparison cut short still has its table so far.
    def fake_summary(label, budget, seed, method):
        return {"label": label, "method": method, "budget": budget, "seed": seed, "epochs": budget,
                "train_seconds": 100.0 * budget, "eval_seconds": 30.0, "peak_rss_mb": 512.0 * (1 + seed),
                "online_probe_test_acc": None, "patch_passes": budget, "results": {"full": {"linear": {"test_acc": 0.5}}}}

    seen = []

    def fake_cell(config, cell, log=print):
        if len(seen) == 3:
            raise KeyboardInterrupt
        seen.append(cell.key)
        return fake_summary(cell.label, cell.budget, cell.seed, cell.label)

    monkeypatch.setattr(compare, "run_cell", fake_cell)
    monkeypatch.setattr(compare, "run_random_init",
                        lambda config, seed, log=print: fake_summary("random init", 0.0, seed, "random_init"))
    with pytest.raises(KeyboardInterrupt):
        compare.run_compare(config, log=lambda *a: None)
    report = json.loads((config.dir / "compare.json").read_text())
    assert not report["complete"] and len(report["cells"]) == 2 + 3 and seen[-1] == "simclr_ep1_seed0"
    md = (config.dir / "compare.md").read_text()
    assert "Cost of these 5 cell(s): 0.08 h in training steps, 0.04 h evaluating; peak resident memory 1.00 GiB." in md
    rows = [line.split(" |")[0] for line in md.splitlines() if line.startswith("| ")][1:]
    assert rows[:2] == ["| emp_ssl", "| simclr"] and rows[2] == "| random init"   # random init listed last
    assert (config.dir / "acc_vs_seconds.png").stat().st_size > 0   # and the figures so far


def test_labels_fall_back_to_the_recipe_when_two_entries_share_a_method(tmp_path):
    config = load_compare_config(write_recipe(tmp_path, tmp_path),
                                 ["methods=[swav/fashion_mnist_1epoch, swav/fashion_mnist_multicrop, byol/cifar10]"])
    assert list(dict.fromkeys(c.label for c in plan_cells(config))) == ["swav-fashion_mnist_1epoch", "swav-fashion_mnist_multicrop",
                                                          "byol"]


def test_every_cell_gets_the_same_eval_protocol(tmp_path):
    from onepoch.runconfig import load_config

    config = load_compare_config(write_recipe(tmp_path, tmp_path), ["eval={probes: [knn]}", "overrides=[]"])
    protocols = {repr(load_config(c.recipe, c.overrides).eval) for c in plan_cells(config)}
    assert len(protocols) == 1
    # ... the defaults, not the recipe's own eval keys (the EMP-SSL demo recipe pins knn_k: 20)
    assert load_config(plan_cells(config)[0].recipe, plan_cells(config)[0].overrides).eval.knn_k == (10, 20, 50)


@pytest.mark.slow
def test_budgets_in_patch_passes_and_seconds(tmp_path, monkeypatch):
    root = make_blobs(tmp_path / "blobs")
    config = load_compare_config(write_recipe(tmp_path, root), ["budget=patch_passes", "budgets=[8]"])
    emp, simclr = plan_cells(config)[0], plan_cells(config)[2]
    assert (cell_epochs(config, emp), cell_epochs(config, simclr)) == (2.0, 4.0)  # 4 and 2 views per image

    config = load_compare_config(write_recipe(tmp_path, root), ["budget=seconds", "budgets=[3]", "calibration_steps=4"])
    cell = plan_cells(config)[0]
    epochs = cell_epochs(config, cell, log=lambda *_: None)
    known = json.loads((config.dir / "calibration.json").read_text())
    assert epochs == pytest.approx(3 / (known["emp_ssl"]["seconds_per_step"] * 4))  # 32 images / 8 per step
    assert not (config.dir / "_calibration" / "emp_ssl").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("the calibration should have been reused")

    monkeypatch.setattr(onepoch.train, "train", no_training)
    assert cell_epochs(config, cell) == epochs


@pytest.mark.slow
def test_compare_writes_tables_and_plots_and_resumes(tmp_path, monkeypatch, capsys):
    root = make_blobs(tmp_path / "blobs")
    path = write_recipe(tmp_path, root)
    assert main(["compare", str(path)]) == 0
    out = tmp_path / "runs" / "tiny"
    report = json.loads((out / "compare.json").read_text())
    assert len(report["cells"]) == 2 * 2 * 2 + 2    # methods x budgets x seeds, + random init per seed
    by_key = {(c["label"], c["budget"], c["seed"]): c for c in report["cells"]}
    assert by_key[("simclr", 2.0, 1)]["steps"] == 8 and by_key[("emp_ssl", 1.0, 0)]["patch_passes"] == 4
    assert by_key[("random init", 0.0, 0)]["train_seconds"] == 0

    md = (out / "compare.md").read_text()
    assert md.startswith("# Comparison `tiny`")
    assert "| method | epochs | train time (s) | online probe | linear (full) | k-NN (full) | linear (map2x2) |" in md
    table_rows = [line for line in md.splitlines() if line.startswith("| emp_ssl |")]
    # every method and budget in one table (2 rows), then a table per budget (2), then 4 by-budget tables
    assert len(table_rows) == 2 + 2 + 4 and all("±" in row for row in table_rows[:4])
    assert "| random init |" in md and "by budget" in md
    for name in ("acc_vs_epochs", "acc_vs_seconds", "acc_vs_patch_passes"):
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    # what the plots draw: per method and budget, the seeds' mean linear-probe accuracy on `full` (the
    # first feature and probe) ± their standard deviation, at the mean epochs / seconds / patch passes
    config = load_compare_config(path)
    figures = accuracy_figures(config, report["cells"])
    for stem, axis in (("acc_vs_epochs", "epochs"), ("acc_vs_seconds", "train_seconds"),
                       ("acc_vs_patch_passes", "patch_passes")):
        (ax,) = figures[stem].axes
        assert ax.get_ylabel() == "test accuracy (%)" and "linear probe on full features" in ax.get_title()
        drawn = {c.get_label(): (c.lines[0].get_xydata().ravel().tolist(),
                                 [seg[1, 1] - seg[0, 1] for seg in c.lines[2][0].get_segments()])
                 for c in ax.containers}
        assert set(drawn) == {"emp_ssl", "simclr"}                 # no point for the random init
        for label in ("emp_ssl", "simclr"):
            xy, err = [], []
            for budget in (1.0, 2.0):
                cells = [by_key[(label, budget, seed)] for seed in (0, 1)]
                accs = [100 * c["results"]["full"]["linear"]["test_acc"] for c in cells]
                xy += [statistics.mean(c[axis] for c in cells), statistics.mean(accs)]
                err.append(2 * statistics.stdev(accs))              # bars span mean - std .. mean + std
            assert drawn[label][0] == pytest.approx(xy)
            assert drawn[label][1] == pytest.approx(err)

    # Interrupted: one cell lost its summary (killed during evaluation), another its whole run directory.
    (out / "emp_ssl_ep2_seed1" / "cell.json").unlink()
    lost = by_key[("simclr", 1.0, 0)]
    shutil.rmtree(out / "simclr_ep1_seed0")
    (out / "compare.md").unlink()
    calls = []
    real_train = onepoch.train.train

    def counting_train(config, **kwargs):
        calls.append((config.name, kwargs.get("resume", False)))
        return real_train(config, **kwargs)

    monkeypatch.setattr(onepoch.train, "train", counting_train)
    capsys.readouterr()
    assert main(["compare", str(path)]) == 0
    assert sorted(calls) == [("emp_ssl_ep2_seed1", True), ("simclr_ep1_seed0", False)]
    again = json.loads((out / "compare.json").read_text())
    redone = {(c["label"], c["budget"], c["seed"]): c for c in again["cells"]}[("simclr", 1.0, 0)]
    assert accuracies(redone) == accuracies(lost)     # deterministic: the same numbers again
    assert [accuracies(c) for c in again["cells"]] == [accuracies(c) for c in report["cells"]]
    assert len((out / "compare.md").read_text().splitlines()) == len(md.splitlines())


def accuracies(summary):
    return {(f, p): r["test_acc"] for f, entry in summary["results"].items() for p, r in entry.items()
            if isinstance(r, dict) and "test_acc" in r}


def test_accuracy_series_use_the_primary_metric_and_skip_missing_results(tmp_path):
    def cell(label, budget, seed, acc, method=None):
        return {"label": label, "method": method or label, "budget": budget, "seed": seed, "epochs": budget,
                "train_seconds": 10.0 * budget + seed, "patch_passes": 2 * budget,
                "results": {"full": {"linear": {"test_acc": acc}}, "bag": {"knn": {"test_acc": acc / 2}}}}

    cells = [cell("a", 1.0, 0, 0.5), cell("a", 1.0, 1, 0.7), cell("a", 3.0, 0, 0.9), cell("b", 1.0, 0, 0.4),
             cell("random init", 0.0, 0, 0.3, method="random_init")]
    cells[3]["results"] = {}                                   # b was evaluated with nothing: no point
    assert accuracy_series(cells, "full", "linear", "train_seconds") == [
        ("a", [10.5, 30.0], [pytest.approx(60.0), pytest.approx(90.0)],
         [pytest.approx(statistics.stdev([50.0, 70.0])), 0.0])]
    config = load_compare_config(write_recipe(tmp_path, tmp_path), ["primary={feature: bag, probe: knn}"])
    (ax,) = accuracy_figures(config, cells)["acc_vs_epochs"].axes
    assert "k-NN probe on bag features" in ax.get_title()
    assert ax.containers[0].lines[0].get_ydata().tolist() == pytest.approx([30.0, 45.0])


def test_markdown_table_from_summaries(tmp_path):
    def cell(label, budget, seed, acc):
        return {"label": label, "method": label, "budget": budget, "seed": seed, "epochs": budget,
                "train_seconds": 10.0 * budget, "online_probe_test_acc": 0.5, "patch_passes": 2 * budget,
                "results": {"full": {"linear": {"test_acc": acc}}}}

    config = load_compare_config(write_recipe(tmp_path, tmp_path, budgets=[1]), [])
    md = format_markdown(config, [cell("a", 1.0, 0, 0.80), cell("a", 1.0, 1, 0.90), cell("b", 1.0, 0, 0.70)])
    assert "| a | 1.000 ± 0.000 | 10 ± 0 | 50.00 ± 0.00 | 85.00 ± 7.07 |" in md
    assert "| b | 1.000 | 10 | 50.00 | 70.00 |" in md
    assert "Evaluation protocol `onepoch`: onepoch's probes, every hyper-parameter chosen on a validation" in md


def test_markdown_names_the_protocol_and_the_paper_protocols_columns(tmp_path):
    cell = {"label": "a", "method": "a", "budget": 1.0, "seed": 0, "epochs": 1.0, "train_seconds": 10.0,
            "online_probe_test_acc": 0.5, "patch_passes": 2.0,
            "results": {"bag": {"linear": {"test_acc": 0.6, "protocol": "onepoch"},
                                "paper_linear": {"test_acc": 0.7, "best_test_acc": 0.75, "protocol": "paper"},
                                "paper_knn": {"test_acc": 0.65, "protocol": "paper"}}}}
    config = load_compare_config(write_recipe(tmp_path, tmp_path, budgets=[1]), ["eval.protocol=both"])
    md = format_markdown(config, [cell])
    assert "Evaluation protocol `both`: onepoch's probes" in md and "EMP-SSL's official probes on the bag" in md
    head = next(line for line in md.splitlines() if line.startswith("| method | epochs | train time"))
    assert head.endswith("| linear (bag) | paper protocol linear, last epoch (bag) | paper protocol k-NN (bag) |")
    assert "| a | 1.000 | 10 | 50.00 | 60.00 | 70.00 | 65.00 |" in md


def test_summary_table_lists_every_budget_with_its_seeds_and_the_papers_number(tmp_path):
    def cell(label, budget, seed, acc, method=None):
        return {"label": label, "method": method or label, "budget": budget, "seed": seed, "epochs": budget,
                "train_seconds": 0.0 if method else 10.0 * budget + seed, "online_probe_test_acc": None,
                "patch_passes": 2 * budget, "results": {"full": {"linear": {"test_acc": acc}}}}

    methods = [{"recipe": "simclr/fashion_mnist_1epoch", "label": "b", "paper": {1: 28.2, 10: "56.5 | note"}},
               {"recipe": "vicreg/fashion_mnist_1epoch", "label": "a"}]
    config = load_compare_config(write_recipe(tmp_path, tmp_path, methods=methods, budgets=[1, 10],
                                              paper_note="Some et al."), [])
    cells = [cell("a", 1.0, 0, 0.5), cell("b", 10.0, 1, 0.7), cell("b", 1.0, 0, 0.4), cell("b", 1.0, 1, 0.6),
             cell("random init", 0.0, 0, 0.3, method="random_init"),
             cell("random init", 0.0, 1, 0.2, method="random_init")]
    md = format_markdown(config, cells)
    table = md[md.index("## Every method and budget"):md.index("## 1 epoch(s)")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert rows == ["| b | 1 | 2 | 10 | 50.00 ± 14.14 | 28.2 |",          # the recipe's order, then by budget
                    "| b | 10 | 1 (seed 1) | 101 | 70.00 | 56.5 / note |",   # a '|' would break the table
                    "| a | 1 | 1 (seed 0) | 10 | 50.00 |  |",
                    "| random init | - | 2 | - | 25.00 ± 7.07 |  |"]
    assert "| method | epochs | seeds | train time (s) | linear (full) | paper |" in table
    assert "Paper: Some et al." in table
    no_paper = load_compare_config(write_recipe(tmp_path, tmp_path, budgets=[1]), [])
    assert "paper" not in format_markdown(no_paper, cells[:1]).split("## 1 epoch(s)")[0].lower()



def test_report_only_writes_the_tables_of_the_finished_cells_and_runs_nothing(tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path, tmp_path, budgets=[1])
    config = load_compare_config(path)
    protocol = eval_protocol(config)

    def write_cell(key, label, method, acc, seed, evaluated_with=protocol):
        summary = {"label": label, "method": method, "budget": 0.0 if method == "random_init" else 1.0,
                   "seed": seed, "epochs": 1.0, "train_seconds": 5.0, "online_probe_test_acc": None,
                   "patch_passes": 2.0, "eval": evaluated_with,
                   "results": {"full": {"linear": {"test_acc": acc}}}}
        (config.dir / key).mkdir(parents=True)
        (config.dir / key / "cell.json").write_text(json.dumps(summary))

    write_cell("emp_ssl_ep1_seed0", "emp_ssl", "emp_ssl", 0.6, 0)
    write_cell("emp_ssl_ep1_seed1", "emp_ssl", "emp_ssl", 0.8, 1)
    write_cell("simclr_ep1_seed0", "simclr", "simclr", 0.5, 0, evaluated_with={**protocol, "knn_k": [3]})
    write_cell("random_init_seed0", "random init", "random_init", 0.3, 0)

    def no_running(*args, **kwargs):
        raise AssertionError("--report-only must not train or evaluate")

    monkeypatch.setattr(onepoch.train, "train", no_running)
    monkeypatch.setattr(onepoch.compare.cells, "run_cell", no_running)
    monkeypatch.setattr(onepoch.compare.cells, "run_random_init", no_running)
    assert main(["compare", str(path), "--report-only"]) == 0
    out = capsys.readouterr().out
    assert "3 cell(s) not finished (random_init_seed1, simclr_ep1_seed0, simclr_ep1_seed1)" in out
    report = json.loads((config.dir / "compare.json").read_text())
    assert [c["label"] for c in report["cells"]] == ["random init", "emp_ssl", "emp_ssl"] and not report["complete"]
    md = (config.dir / "compare.md").read_text()
    assert "| emp_ssl | 1 | 2 | 5 | 70.00 ± 14.14 |" in md     # simclr's cell was evaluated otherwise: left out
    assert "| simclr |" not in md and not (config.dir / "locks").exists()


@pytest.mark.slow
def test_a_changed_eval_protocol_reevaluates_without_retraining(tmp_path, monkeypatch, capsys):
    root = make_blobs(tmp_path / "blobs")
    path = write_recipe(tmp_path, root, methods=["simclr/fashion_mnist_1epoch"], budgets=[1], seeds=[0],
                        random_init=False, overrides=[*TINY_CELL, "method.projector=32-16"])
    assert main(["compare", str(path)]) == 0
    cell = tmp_path / "runs" / "tiny" / "simclr_ep1_seed0" / "cell.json"
    first = json.loads(cell.read_text())
    calls = []
    real_train = onepoch.train.train

    def counting_train(config, **kwargs):
        calls.append(kwargs.get("resume", False))
        return real_train(config, **kwargs)

    monkeypatch.setattr(onepoch.train, "train", counting_train)
    assert main(["compare", str(path)]) == 0 and calls == []            # same protocol: reused as is
    assert main(["compare", str(path), "eval.probes=[knn]", "eval.knn_k=[3]"]) == 0
    assert calls == [True]                                               # resumed (nothing to train), evaluated again
    again = json.loads(cell.read_text())
    assert again["eval"]["knn_k"] == [3] and set(again["results"]["full"]) == {"knn", "embed_seconds", "dim", "test_images"}
    assert again["results"]["full"]["knn"]["chosen"]["k"] == 3 and again["steps"] == first["steps"]
