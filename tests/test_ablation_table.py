"""scripts/emp_ssl_ablation_table.py: the table of docs/reproducing_emp_ssl.md from the runs' eval.json files."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "emp_ssl_ablation_table.py"


def table_module():
    spec = importlib.util.spec_from_file_location("emp_ssl_ablation_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(out: Path, name: str, grid_linear: float, paper_last: float):
    run = out / name
    run.mkdir(parents=True)
    results = {"grid": {"linear": {"test_acc": grid_linear}},
               "bag": {"paper_linear": {"test_acc": paper_last, "best_test_acc": paper_last + 0.001}}}
    (run / "eval.json").write_text(json.dumps({"results": results}))


def test_each_cell_is_the_mean_over_its_seeds_and_its_change_against_its_reference(tmp_path):
    write_run(tmp_path, "base_seed0", 0.60, 0.50)
    write_run(tmp_path, "base_seed1", 0.62, 0.52)
    write_run(tmp_path, "sched2_seed0", 0.65, 0.51)
    write_run(tmp_path, "base_w05_seed0", 0.70, 0.60)
    write_run(tmp_path, "sched2_w05_seed0", 0.72, 0.59)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in
            table_module().table(tmp_path).splitlines()[2:]}
    columns = [c[0] for c in table_module().COLUMNS]
    grid, paper = 3 + columns.index("grid linear"), 3 + columns.index("paper linear, last")
    assert rows["base"][2] == "0, 1"
    assert rows["base"][grid] == "61.00 ± 1.41"                    # mean ± sample standard deviation
    assert rows["sched2"][grid] == "65.00 (+4.00)"                 # against base's mean
    assert rows["sched2_w05"][grid] == "72.00 (+2.00)"             # against base_w05, not base
    assert rows["sched2_w05"][paper] == "59.00 (-1.00)"
    assert rows["base_w05"][grid] == "70.00"                       # a reference has no change column
    assert rows["dp4"][2:5] == ["-", "-", "-"]                     # not measured
