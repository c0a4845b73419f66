"""End to end on real data: a short `onepoch demo` on a Fashion-MNIST subset (Debian's package)."""

import json
from pathlib import Path

import pytest

from onepoch.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian's dataset-fashion-mnist is not installed")


@needs_fashion
def test_short_demo_beats_chance_and_writes_its_report(tmp_path, capsys):
    rc = main(["demo", "--data", str(tmp_path / "fm"), "--out", str(tmp_path / "runs"), "--no-download",
               "data.limit=2000", "data.test_limit=500", "train.max_steps=6", "model.width=0.125",
               "views.count=4", "eval.features=[map2x2]", "eval.linear_epochs=[40]",
               "eval.linear_weight_decays=[0.0]"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "logistic regression, raw pixels" in out and "random-init network" in out and "EMP-SSL 1 epoch" in out
    report = json.loads((tmp_path / "runs" / "fashion_mnist_demo" / "demo.json").read_text())
    assert report["steps"] == 6
    for entry in (report["raw_pixels"], *report["emp_ssl"].values(), *report["random_init"].values()):
        assert entry["linear"]["test_acc"] > 0.6  # 10 balanced classes: chance is 0.1
    assert set(report["emp_ssl"]) == set(report["random_init"]) == {"map2x2"}
    assert report["emp_ssl"]["map2x2"]["knn"]["test_acc"] > 0.6
    # A second demo goes into a new run directory instead of failing.
    assert main(["demo", "--data", str(tmp_path / "fm"), "--out", str(tmp_path / "runs"), "--no-download",
                 "data.limit=200", "data.test_limit=100", "train.max_steps=1", "model.width=0.125",
                 "views.count=2", "eval.bag_patches=1", "eval.linear_epochs=[1]",
                 "eval.linear_weight_decays=[0.0]", "eval.probes=[knn]"]) == 0
    assert (tmp_path / "runs" / "fashion_mnist_demo-2" / "demo.json").exists()
