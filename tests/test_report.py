"""`onepoch report`: report.md and its figures for a run directory."""

import pytest
import torch
from PIL import Image
from test_train import blobs, tiny_config  # noqa: F401  (fixture)

from onepoch.cli import main
from onepoch.report import moving_average, pca_2d
from onepoch.train import train


def test_moving_average():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]


def test_pca_2d_finds_the_plane_of_largest_variance():
    g = torch.Generator().manual_seed(0)
    coords = torch.randn(500, 2, generator=g) * torch.tensor([5.0, 2.0])
    basis = torch.linalg.qr(torch.randn(10, 10, generator=g))[0][:, :2]       # an orthonormal 2-D plane in 10-D
    x = coords @ basis.T + 0.01 * torch.randn(500, 10, generator=g) + 3.0
    xy = pca_2d(x)
    assert xy.shape == (500, 2)
    var = xy.var(0)
    assert var[0] == pytest.approx(25.0, rel=0.15) and var[1] == pytest.approx(4.0, rel=0.15)
    # each component matches a true coordinate up to sign
    for i in range(2):
        corr = torch.corrcoef(torch.stack([xy[:, i], coords[:, i]]))[0, 1].abs()
        assert corr > 0.99


def test_onepoch_report_writes_markdown_and_figures(tmp_path, blobs, capsys):  # noqa: F811
    config = tiny_config(tmp_path, blobs, "train.max_steps=6")
    train(config, progress_bar=False)
    assert main(["eval", str(config.run_dir), "--features", "full", "--probe", "knn", "eval.knn_k=5"]) == 0
    assert main(["report", str(config.run_dir), "--smooth", "2"]) == 0
    md = (config.run_dir / "report.md").read_text()
    assert md.startswith(f"# Run `{config.name}`")
    assert "- steps: 6 (newest checkpoint: step_0000006.pt)" in md
    assert "## Evaluation (`eval.json`, step 6)" in md and "| full |" in md
    names = ["curves_loss", "curves_lr", "curves_online_probe", "curves_throughput", "views", "embedding_pca"]
    for name in names:
        assert f"![{name}]({name}.png)" in md
        with Image.open(config.run_dir / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    with Image.open(config.run_dir / "views.png") as im:   # 6 rows (images) of 5 columns (image + 4 views)
        assert im.size[1] > im.size[0] > 4 * 8 * 8


def test_report_of_an_untrained_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) != 0
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err
