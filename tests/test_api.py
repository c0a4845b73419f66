"""The Python API: onepoch.train / evaluate / load_backbone / embed / recipes, and `onepoch recipes`."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import TINY, blobs  # noqa: F401  (fixture)

import onepoch
from onepoch.api import dotted_overrides
from onepoch.config import parse_override
from onepoch.data import open_split
from onepoch.errors import ConfigError
from onepoch.runconfig import RECIPES_DIR


def test_dotted_overrides():
    assert dotted_overrides({"train": {"epochs": 2, "out": "x"}, "name": "a", "eval.probes": ["knn"],
                             "views": {"groups": [{"count": 1}]}, "method": {}}) == {
        "train.epochs": 2, "train.out": "x", "name": "a", "eval.probes": ["knn"], "views.groups": [{"count": 1}],
        "method": {}}


def test_train_evaluate_load_and_embed(tmp_path, blobs):  # noqa: F811
    tiny = dict(parse_override(o) for o in TINY)
    run = onepoch.train("emp_ssl/fashion_mnist_demo", progress_bar=False, name="api", data={"root": str(blobs)},
                        train={"out": str(tmp_path / "runs"), "max_steps": 4, "log_every": 1}, **tiny)
    assert run.run_dir == tmp_path / "runs" / "api" and run.steps == 4
    assert [r["step"] for r in run.metrics] == [1, 2, 3, 4] and run.metrics[-1]["loss"] == pytest.approx(run.final_loss)

    report = onepoch.evaluate(run.run_dir, probes=["knn"], features=["full"], knn_k=5, log=lambda *a: None)
    assert report["step"] == 4 and report["eval_config"]["knn_k"] == 5
    assert 0 <= report["results"]["full"]["knn"]["test_acc"] <= 1

    backbone = onepoch.load_backbone(run.run_dir)
    assert not backbone.training and next(backbone.parameters()).device.type == "cpu"
    split = open_split(blobs, "test")
    features = onepoch.embed(backbone, split.images[:10], batch_size=3)
    assert features.shape == (10, backbone.feature_dim) and features.dtype == torch.float32
    # the same numbers as the evaluation's whole-image features of the trained model
    from onepoch.eval import embed_split
    from onepoch.run import view_spec_for

    train_split = open_split(blobs, "train")                  # the evaluation normalises with its statistics
    spec = view_spec_for(run_config(run.run_dir), train_split.mean, train_split.std)
    reference = embed_split(run.model.eval(), split.images[:10], "full", spec=spec, batch_size=10,
                            device=torch.device("cpu"), seed=0)
    assert torch.allclose(features, reference, rtol=1e-4, atol=1e-5)
    # a float batch is used as it is; explicit mean/std win over the model's
    x = torch.from_numpy(split.images[:4].copy()).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(onepoch.embed(backbone, x), onepoch.embed(backbone, split.images[:4], mean=[0.0], std=[1.0]),
                          atol=1e-5)


def run_config(run_dir):
    from onepoch.run import read_run_config

    return read_run_config(run_dir)


def test_embed_checks_its_input():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with pytest.raises(ConfigError, match=r"uint8 \(N, H, W, C\) or a float tensor \(N, C, H, W\)"):
        onepoch.embed(model, torch.zeros(2, 12, dtype=torch.int64))
    with pytest.raises(ConfigError, match="one value per channel"):
        onepoch.embed(model, np.zeros((2, 2, 2, 3), np.uint8), mean=[0.5], std=[0.5])
    out = onepoch.embed(model, np.zeros((5, 2, 2, 3), np.uint8))
    assert out.shape == (5, 2)


def test_onepoch_train_is_the_api_function_and_still_the_trainer_module():
    import onepoch.train as trainer_module
    from onepoch.train import train as trainer

    assert callable(onepoch.train) and onepoch.train is trainer_module and onepoch.train.train is trainer
    with pytest.raises(ConfigError, match="recipe 'emp_ssl/nope' not found"):
        onepoch.train("emp_ssl/nope")
    code = "import sys, onepoch; print('torch' in sys.modules, onepoch.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split()[0] == "False", proc.stderr             # `import onepoch` stays light


def test_recipes_list_every_shipped_recipe_in_one_line(capsys):
    entries = onepoch.recipes()
    shipped = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
    assert sorted(entries) == shipped
    assert list(entries)[-5:] == ["compare/cifar10", "compare/cifar100_cpu", "compare/cifar10_cpu",
                                  "compare/fashion_mnist_1epoch", "compare/imagenette_cpu"]
    assert all(0 < len(text) <= 110 and "\n" not in text for text in entries.values())
    assert entries["simclr/fashion_mnist_1epoch"].startswith("SimCLR (Chen et al. 2020) for one epoch on Fashion-MNIST")
    from onepoch.cli import main

    assert main(["recipes"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]   # the recipe table
    assert len(rows) == len(shipped) and rows[0].startswith(f"| `{list(entries)[0]}` |")


def _readme_block(heading: str) -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_the_readme_python_api_example_defines_every_name_it_uses():
    """Issue 29: the README's Python API example used `images` without saying where they come from.
    Every name a statement reads must be a builtin or set by an earlier statement (import or assignment)."""
    import ast
    import builtins

    defined = set(dir(builtins))
    for statement in ast.parse(_readme_block("## Python API")).body:
        used = {n.id for n in ast.walk(statement) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert used <= defined, f"line {statement.lineno} uses {sorted(used - defined)} before defining it"
        defined |= {n.id for n in ast.walk(statement) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        defined |= {(a.asname or a.name).split(".")[0] for n in ast.walk(statement)
                    if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
