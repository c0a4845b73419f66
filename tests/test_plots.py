"""PNG plots drawn with Pillow: valid files, visible content, robust to odd data, clear errors."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from onepoch import plots
from onepoch.plots import (
    PALETTE,
    image_grid,
    line_plot,
    multi_panel,
    nice_ticks,
    render_image_grid,
    render_line_plot,
    render_scatter_plot,
    scatter_plot,
)

EPOCHS = [1, 2, 4, 8]
SERIES = [("emp_ssl", EPOCHS, [60, 70, 75, 80], [1, 1.5, 0.5, 0.8]),
          ("simclr", EPOCHS, [40, 55, 68, 76]),
          ("byol", EPOCHS, [30, 45, 60, 70])]


def _open(path, size):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size and im.mode == "RGB"
        return np.asarray(im.convert("RGB"))


def _non_white(a: np.ndarray) -> int:
    return int((a != 255).any(axis=-1).sum())


def _count(a: np.ndarray, colour) -> int:
    return int((a == colour).all(axis=-1).sum())


def _colours(a: np.ndarray) -> set:
    packed = np.unique(a.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))
    return {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255) for v in packed}


def test_line_plot_writes_a_png_with_every_series_colour(tmp_path):
    path = line_plot(tmp_path / "acc.png", SERIES, title="accuracy", xlabel="epochs", ylabel="test accuracy (%)")
    assert path == tmp_path / "acc.png"
    a = _open(path, (800, 500))
    assert _non_white(a) > 5000
    # Each series draws its own curve in its own colour (far more pixels than its legend entry alone).
    assert all(_count(a, c) > 500 for c in PALETTE[:3])
    assert PALETTE[3] not in _colours(a)  # only as many colours as series


def test_line_plot_size_and_log_axes(tmp_path):
    steps = np.arange(1, 3001)
    lr = 0.3 * 0.5 * (1 + np.cos(np.pi * steps / 3001))
    a = _open(line_plot(tmp_path / "lr.png", [("lr", steps, lr)], title="lr", xlabel="step", ylabel="lr",
                        logx=True, logy=True, size=(400, 300)), (400, 300))
    assert PALETTE[0] in _colours(a) and _non_white(a) > 1000


@pytest.mark.parametrize("which, region", [("title", "top"), ("xlabel", "bottom"), ("ylabel", "left")])
def test_title_and_axis_labels_are_drawn_where_they_belong(which, region):
    kwargs = {"title": "", "xlabel": "", "ylabel": ""}
    blank = np.asarray(render_line_plot(SERIES, **kwargs))
    kwargs[which] = "a fairly long piece of text"
    drawn = np.asarray(render_line_plot(SERIES, **kwargs))
    diff = Image.fromarray((blank != drawn).any(axis=-1).astype(np.uint8) * 255).getbbox()
    assert diff is not None, f"{which} was not drawn"
    left, top, right, bottom = diff
    h, w = blank.shape[:2]
    assert {"top": bottom < 0.12 * h, "bottom": top > 0.88 * h, "left": right < 0.06 * w}[region], diff
    assert right - left > 40 or bottom - top > 40  # text, not a dot


def test_nan_single_point_equal_values_and_empty_series_do_not_crash():
    nan = math.nan
    cases = [
        [("a", [1, 2, 3, 4], [1.0, nan, 3.0, nan]), ("b", [nan, 2, 3], [1, 2, 3], [nan, 0.1, 0.2])],
        [("one", [5], [0.7])],
        [("flat", [3, 3, 3], [2, 2, 2], [0, 0, 0])],
        [("zeros on a log axis", [0, 1, 10], [-1, 0, 5])],
        [("all nan", [nan, nan], [nan, nan]), ("empty", [], [])],
        [],
    ]
    for series in cases:
        im = render_line_plot(series, title="t", xlabel="x", ylabel="y", logy=series is cases[3])
        a = np.asarray(im)
        assert im.size == (800, 500) and _non_white(a) > 1000  # at least the axes and labels
    one = np.asarray(render_line_plot(cases[1]))
    h, w = one.shape[:2]
    assert _count(one[h // 3: 2 * h // 3, w // 3: 2 * w // 3], PALETTE[0]) > 10  # a lone point gets a marker
    # A series ending in NaN still shows its finite points.
    assert PALETTE[0] in _colours(np.asarray(render_line_plot([("a", [1, 2, 3], [1.0, 2.0, nan])])))


def test_empty_plot_says_no_data():
    empty = np.asarray(render_line_plot([], title="t", xlabel="x", ylabel="y"))
    none = np.asarray(render_line_plot([("a", [math.nan], [1.0])], title="t", xlabel="x", ylabel="y"))
    h, w = empty.shape[:2]
    centre = empty[h // 2 - 12: h // 2 + 12, w // 2 - 60: w // 2 + 60]
    assert (centre.sum(axis=-1) < 600).any()  # the "no data" note sits in the middle
    assert (none == empty).all()


def test_nice_ticks_use_1_2_5_steps():
    assert nice_ticks(0, 1, 5) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ticks = nice_ticks(37.3, 82.9, 6)
    step = ticks[1] - ticks[0]
    assert step == pytest.approx(10) and ticks[0] == pytest.approx(40) and ticks[-1] == pytest.approx(80)
    for lo, hi in [(0.00123, 0.00456), (-3e5, 7e6), (-1, 1), (2, 2.0001)]:
        ticks = nice_ticks(lo, hi, 6)
        assert 2 <= len(ticks) <= 7 and lo - 1e-12 <= ticks[0] and ticks[-1] <= hi + 1e-12
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-6
    assert nice_ticks(3, 3) == [3]


@pytest.mark.parametrize("series, match", [
    ([("a", [1, 2, 3], [1, 2])], "ys has 2 values"),
    ([("a", [1, 2], [1, 2], [0.1])], "yerr has 1 values"),
    ([("a", [1, 2])], "series 0 must be"),
    (["abc"], "series 0 must be"),
    ([("a", [[1, 2]], [[1, 2]])], "one-dimensional"),
    ([("a", ["x", "y"], [1, 2])], "sequence of numbers"),
])
def test_line_plot_rejects_bad_series(tmp_path, series, match):
    with pytest.raises(ValueError, match=match):
        line_plot(tmp_path / "bad.png", series, title="t", xlabel="x", ylabel="y")
    assert not list(tmp_path.iterdir())


def test_bad_size_is_rejected():
    with pytest.raises(ValueError, match="size"):
        render_line_plot(SERIES, size=(50, 50))
    with pytest.raises(ValueError, match="size"):
        render_line_plot(SERIES, size=800)


def test_scatter_plot_colours_classes_and_subsamples_reproducibly(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    points = rng.normal(size=(2000, 2)) + labels[:, None] * 4.0
    path = scatter_plot(tmp_path / "emb.png", points, labels, class_names=["cat", "dog", "ship"],
                        title="embedding", xlabel="pc 1", ylabel="pc 2", max_points=500)
    a = _open(path, (700, 700))
    plot_area = a[:, : int(0.75 * a.shape[1])]  # the legend is on the right
    assert all(_count(plot_area, c) > 100 for c in PALETTE[:3])
    assert PALETTE[3] not in _colours(a)
    again = np.asarray(render_scatter_plot(points, labels, class_names=["cat", "dog", "ship"], title="embedding",
                                           xlabel="pc 1", ylabel="pc 2", max_points=500))
    assert (a == again).all()  # the subsample is seeded
    more = np.asarray(render_scatter_plot(points, labels, class_names=["cat", "dog", "ship"], title="embedding",
                                          xlabel="pc 1", ylabel="pc 2", max_points=2000))
    assert _non_white(more) > _non_white(a)


def test_scatter_plot_handles_nan_torch_and_many_classes():
    pts = torch.randn(300, 2)
    pts[0, 0] = math.nan
    labels = torch.arange(300) % 100
    im = render_scatter_plot(pts, labels, class_names=[f"class {i}" for i in range(100)], size=(400, 400))
    assert im.size == (400, 400)
    im = render_scatter_plot(np.zeros((0, 2)), np.zeros(0, dtype=int), class_names=["a"])
    assert im.size == (700, 700)


@pytest.mark.parametrize("points, labels, names, match", [
    (np.zeros((5, 3)), np.zeros(5, int), ["a"], r"shape \(N, 2\)"),
    (np.zeros((5, 2)), np.zeros(4, int), ["a"], "labels must have shape"),
    (np.zeros((5, 2)), np.full(5, 2), ["a", "b"], r"integers in \[0, 2\)"),
    (np.zeros((5, 2)), np.full(5, 0.5), ["a", "b"], "integers"),
    (np.zeros((5, 2)), np.zeros(5, int), [], "class_names"),
])
def test_scatter_plot_rejects_bad_inputs(points, labels, names, match):
    with pytest.raises(ValueError, match=match):
        render_scatter_plot(points, labels, class_names=names)


def test_image_grid_places_tiles_and_titles(tmp_path):
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]], np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (6, 8, 8, 3))
    path = image_grid(tmp_path / "views.png", images, rows=2, cols=3, scale=2, pad=2)
    a = _open(path, (3 * 16 + 4 * 2, 2 * 16 + 3 * 2))
    for i, c in enumerate(colours):
        r, col = divmod(i, 3)
        y, x = 2 + r * 18 + 8, 2 + col * 18 + 8
        assert tuple(a[y, x]) == tuple(c)
    titled = render_image_grid(images, rows=2, cols=3, scale=2, titles=["image", "view 1"],
                               col_titles=["a", "b", "group 1 view 1"])
    assert titled.width > a.shape[1] and titled.height > a.shape[0]


def test_image_grid_accepts_float_grey_and_torch_images():
    grey = render_image_grid(np.full((5, 4, 4, 1), 0.5, np.float32))  # a 3 x 2 grid, one cell empty
    assert grey.size == (3 * 4 + 4 * 2, 2 * 4 + 3 * 2)
    assert grey.getpixel((4, 4)) == (128, 128, 128)
    t = render_image_grid(torch.ones(2, 4, 4, 3), cols=2, pad=0)
    assert t.size == (8, 4) and t.getpixel((5, 1)) == (255, 255, 255)


@pytest.mark.parametrize("images, kwargs, match", [
    (np.zeros((2, 4, 4, 4), np.uint8), {}, r"\(N, H, W, C\)"),
    (np.zeros((4, 4), np.uint8), {}, r"\(N, H, W, C\)"),
    (np.zeros((0, 4, 4, 3), np.uint8), {}, r"\(N, H, W, C\)"),
    (np.full((2, 4, 4, 3), 200.0), {}, r"\[0, 1\]"),
    (np.zeros((5, 4, 4, 3), np.uint8), {"rows": 2, "cols": 2}, "cannot hold 5"),
    (np.zeros((4, 4, 4, 3), np.uint8), {"rows": 2, "titles": ["one"]}, "titles has 1"),
    (np.zeros((4, 4, 4, 3), np.uint8), {"cols": 2, "col_titles": ["a", "b", "c"]}, "col_titles has 3"),
    (np.zeros((4, 4, 4, 3), np.uint8), {"scale": 0}, "scale"),
])
def test_image_grid_rejects_bad_inputs(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        render_image_grid(images, **kwargs)


def test_multi_panel_pastes_rendered_panels(tmp_path):
    steps = list(range(100))
    panels = [{"series": [("loss", steps, [1 / (s + 1) for s in steps])], "title": "loss", "xlabel": "step"},
              {"series": [("lr", steps, [0.1] * 100)], "title": "lr"},
              {"series": [], "title": "online probe"}]
    path = multi_panel(tmp_path / "curves.png", panels, cols=2, panel_size=(300, 200), title="training")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.width == 600 and im.height > 400
    with pytest.raises(ValueError):
        multi_panel(tmp_path / "none.png", [])
    with pytest.raises(ValueError):
        multi_panel(tmp_path / "bad.png", ["not a panel"])


def test_png_written_atomically_replacing_an_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "plot.png"
    path.write_bytes(b"not a png")
    line_plot(path, SERIES, title="t", xlabel="x", ylabel="y", size=(300, 200))
    _open(path, (300, 200))
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temporary file left behind

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        image_grid(path, np.zeros((1, 4, 4, 3), np.uint8))
    monkeypatch.undo()
    _open(path, (300, 200))  # the old complete file is still there
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_colours_beyond_the_palette_stay_distinct():
    many = [plots.colour(i) for i in range(40)]
    assert many[: len(PALETTE)] == PALETTE
    assert len(set(many)) == 40
