"""`onepoch report`: report.md and its figures for a run directory."""

import numpy as np
import pytest
import torch
from test_train import blobs, tiny_config  # noqa: F401  (fixture)

from onepoch.cli import main
from onepoch.data import open_split
from onepoch.report import curves_panels, moving_average, pca_2d, write_curves
from onepoch.train import train
from onepoch.views.tiles import run_view_tiles, view_tiles


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


def test_curves_panels_plot_the_metrics_rows(tmp_path):
    rows = [{"step": i + 1, "loss": 10.0 - i, "tcr": -float(i), "lr": 0.1 * i, "patches_per_s": 100.0 + i,
             "online_probe_acc": 0.1 * i, "online_probe_loss": 2.0, "epoch": 0, "time": 0.0} for i in range(4)]
    loss, lr, probe, speed = curves_panels(rows, smooth=2)
    assert {label: ys for label, _, ys in loss["series"]} == {"loss": [10.0, 9.5, 8.5, 7.5],
                                                               "tcr": [0.0, -0.5, -1.5, -2.5]}
    assert all(xs == [1, 2, 3, 4] for _, xs, _ in loss["series"])
    assert lr["series"] == [("learning rate", [1, 2, 3, 4], [0.0, 0.1, 0.2, 0.1 * 3])]   # never smoothed
    assert probe["series"][0][2] == pytest.approx([0.0, 0.05, 0.15, 0.25])
    assert speed["series"][0][2] == [100.0, 100.5, 101.5, 102.5]
    assert curves_panels([{k: v for k, v in r.items() if "probe" not in k} for r in rows], 1)[2]["series"] == []
    assert write_curves(tmp_path, rows, 2, "svg").read_bytes().startswith(b"<?xml")
    assert [p.name for p in tmp_path.iterdir()] == ["curves.svg"]


def test_view_tiles_put_each_image_before_its_views():
    originals = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(2, 4, 4, 1) * 7
    big = torch.rand(3, 2, 1, 4, 4)                   # 3 views of 4x4
    small = torch.rand(1, 2, 1, 2, 2)                 # 1 view of 2x2, enlarged (nearest) to 4x4
    tiles = view_tiles(originals, [big, small])
    assert tiles.shape == (2, 5, 4, 4, 1)
    assert np.allclose(tiles[:, 0, ..., 0], originals[..., 0].numpy() / 255)
    assert np.allclose(tiles[1, 2, ..., 0], big[1, 1, 0].numpy())
    assert np.allclose(tiles[0, 4, ..., 0], np.kron(small[0, 0, 0].numpy(), np.ones((2, 2))))


def test_onepoch_report_writes_markdown_and_figures(tmp_path, blobs, capsys):  # noqa: F811
    config = tiny_config(tmp_path, blobs, "train.max_steps=6")
    train(config, progress_bar=False)
    assert main(["eval", str(config.run_dir), "--features", "full", "--probe", "knn", "eval.knn_k=5"]) == 0
    assert main(["report", str(config.run_dir), "--smooth", "2"]) == 0
    md = (config.run_dir / "report.md").read_text()
    assert md.startswith(f"# Run `{config.name}`")
    assert "- steps: 6 (newest checkpoint: step_0000006.pt)" in md
    assert "## Evaluation (`eval.json`, step 6)" in md and "| full |" in md
    for name in ["curves", "views", "embedding_pca"]:
        assert f"![{name}]({name}.png)" in md
        assert (config.run_dir / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    # the views figure shows the first images of the training split, then views of them
    tiles, titles = run_view_tiles(config, open_split(blobs, "train"))
    assert tiles.shape[:2] == (6, 5) and titles == ["image", "view 1", "view 2", "view 3", "view 4"]
    first = open_split(blobs, "train").images[:6].astype(np.float32) / 255
    assert tiles.shape[2] == 8 and not np.allclose(tiles[:, 1], tiles[:, 2])
    assert np.allclose(tiles[:, 0].mean(axis=(1, 2, 3)), first.mean(axis=(1, 2, 3)), atol=0.02)  # resized 12 -> 8



def test_report_of_an_untrained_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) != 0
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err


def test_report_labels_each_protocol():
    from onepoch.report import _eval_lines

    report = {"results": {
        "grid": {"linear": {"test_acc": 0.691, "val_acc": 0.70, "protocol": "onepoch"}},
        "bag": {"paper_linear": {"test_acc": 0.6, "best_test_acc": 0.625, "protocol": "paper"},
                "paper_knn": {"test_acc": 0.55, "protocol": "paper"}}}}
    lines = _eval_lines(report)
    assert lines[0] == ("| features | linear test % (val %) | paper protocol linear: last epoch % (best epoch* %) | "
                        "paper protocol k-NN % |")
    assert "| grid | 69.10 (70.00) | - | - |" in lines
    assert "| bag | - | 60.00 (62.50) | 55.00 |" in lines
    assert "chosen on the test set" in lines[-1]
    assert not any("paper" in line for line in _eval_lines({"results": {"grid": report["results"]["grid"]}}))
