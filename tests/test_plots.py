"""onepoch.plots: the data each figure draws, the file formats, and bad input."""

import numpy as np
import pytest

from onepoch.errors import ConfigError
from onepoch.plots import (
    figure_format,
    image_grid_figure,
    line_panels_figure,
    save_figure,
    scatter_figure,
    tile_mosaic,
)


def test_line_panels_draw_each_series_and_its_error_bars():
    fig = line_panels_figure([
        {"title": "acc", "xlabel": "epochs", "ylabel": "%",
         "series": [("a", [1, 2, 4], [50.0, 60.0, 70.0], [1.0, 0.5, 0.0]), ("b", [1, 2], [40.0, float("nan")])]},
        {"title": "lr", "series": [("lr", [1, 2, 3], [0.1, 0.2, 0.05])]},
        {"title": "empty", "series": []},
    ], title="run")
    acc, lr, empty, spare = fig.axes
    assert not spare.get_visible()                               # 3 panels on a 2 x 2 grid
    assert acc.get_title() == "acc" and acc.get_xlabel() == "epochs" and fig.get_suptitle() == "run"
    (container,) = acc.containers                                # "a", drawn with error bars
    assert container.get_label() == "a"
    assert container.lines[0].get_xydata().tolist() == [[1, 50], [2, 60], [4, 70]]
    (line_b,) = [line for line in acc.lines if line.get_label() == "b"]
    xy_b = line_b.get_xydata()
    assert xy_b[0].tolist() == [1, 40] and np.isnan(xy_b[1, 1])  # a NaN is a gap, not a made-up point
    # the error bars of "a": vertical segments from y - err to y + err at each x
    segments = [seg.tolist() for seg in container.lines[2][0].get_segments()]
    assert segments == [[[1, 49], [1, 51]], [[2, 59.5], [2, 60.5]], [[4, 70], [4, 70]]]
    assert sorted(t.get_text() for t in acc.get_legend().get_texts()) == ["a", "b"]
    assert lr.lines[0].get_ydata().tolist() == [0.1, 0.2, 0.05] and lr.get_legend() is None
    assert [t.get_text() for t in empty.texts] == ["no data"]


def test_line_panels_reject_bad_series():
    with pytest.raises(ValueError, match="at least one panel"):
        line_panels_figure([])
    with pytest.raises(ValueError, match="1-D and of one length"):
        line_panels_figure([{"series": [("a", [1, 2, 3], [1, 2])]}])
    with pytest.raises(ValueError, match=r"\(label, xs, ys\)"):
        line_panels_figure([{"series": [("a", [1, 2])]}])


def test_scatter_draws_every_point_with_its_class():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 2))
    points[7] = np.nan
    labels = np.arange(300) % 3
    fig = scatter_figure(points, labels, class_names=["cat", "dog", "cow"], title="pca")
    (ax,) = [a for a in fig.axes if a.collections]
    drawn, classes = ax.collections[0].get_offsets(), np.asarray(ax.collections[0].get_array())
    assert len(drawn) == 299                                     # the NaN row left out
    # the same (point, class) pairs, in a shuffled order
    expected = sorted(map(tuple, np.column_stack([np.delete(points, 7, 0), np.delete(labels, 7)]).tolist()))
    assert sorted(map(tuple, np.column_stack([drawn, classes]).tolist())) == expected
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cat", "dog", "cow"]
    few = scatter_figure(points, labels, class_names=["cat", "dog", "cow"], max_points=50)
    assert len([a for a in few.axes if a.collections][0].collections[0].get_offsets()) == 50
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 2\)"):
        scatter_figure(points, labels, class_names=["cat", "dog"])
    with pytest.raises(ValueError, match=r"points must be \(N, 2\)"):
        scatter_figure(points[:, :1], labels, class_names=["a", "b", "c"])


def test_tile_mosaic_places_each_tile_with_padding():
    tiles = np.zeros((2, 3, 4, 5, 1), dtype=np.float32)
    for r in range(2):
        for c in range(3):
            tiles[r, c] = (r * 3 + c + 1) / 10
    mosaic = tile_mosaic(tiles, pad=2)
    assert mosaic.shape == (2 * 6 + 2, 3 * 7 + 2, 3)
    assert np.all(mosaic[:2] == 1.0) and np.all(mosaic[:, :2] == 1.0)   # white border
    assert np.allclose(mosaic[2 + 6:2 + 6 + 4, 2 + 14:2 + 14 + 5], 0.6)  # row 1, column 2: tile 6
    assert np.allclose(mosaic[2:6, 2:7], 0.1)
    with pytest.raises(ValueError, match=r"\(rows, cols, h, w, C\)"):
        tile_mosaic(np.zeros((2, 4, 5, 3)))


def test_image_grid_shows_the_mosaic_pixel_for_pixel_with_column_titles():
    rng = np.random.default_rng(1)
    tiles = rng.random((3, 4, 8, 8, 3)).astype(np.float32)
    fig = image_grid_figure(tiles, col_titles=["image", "view 1", "view 2", "view 3"], zoom=3)
    (ax,) = fig.axes
    (image,) = ax.images
    assert np.array_equal(np.asarray(image.get_array()), tile_mosaic(tiles))
    assert image.get_interpolation() == "nearest"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["image", "view 1", "view 2", "view 3"]
    assert ax.get_xticks().tolist() == [2 + 3.5, 12 + 3.5, 22 + 3.5, 32 + 3.5]   # centred on each column
    width_px = fig.get_figwidth() * fig.dpi
    assert width_px == pytest.approx(3 * tile_mosaic(tiles).shape[1])
    with pytest.raises(ValueError, match="col_titles has 2 entries for 4 columns"):
        image_grid_figure(tiles, col_titles=["a", "b"])


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_save_figure_picks_the_format_from_the_extension(tmp_path, suffix, magic):
    fig = line_panels_figure([{"series": [("a", [0, 1], [0, 1])]}])
    path = save_figure(fig, tmp_path / "sub" / f"fig{suffix}")
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in path.parent.iterdir()] == [f"fig{suffix}"]   # no temporary file left


def test_unknown_figure_format_is_a_config_error(tmp_path):
    assert figure_format("a/b.PNG") == "png"
    with pytest.raises(ConfigError, match=r"\.png, \.svg or \.pdf, not '\.jpg'"):
        save_figure(line_panels_figure([{"series": []}]), tmp_path / "x.jpg")
    assert not (tmp_path / "x.jpg").exists()
