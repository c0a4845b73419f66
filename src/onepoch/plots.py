"""Figures with matplotlib: line panels (training curves, accuracy against a budget with error
bars), a scatter map (the PCA of test features) and an image grid (images and their views).

Every ``*_figure`` function returns a :class:`matplotlib.figure.Figure` built without pyplot (no
global state, no GUI backend; it displays in a notebook as it is); :func:`save_figure` writes one
atomically, as PNG, SVG or PDF after the file's extension. Bad inputs raise ``ValueError``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from onepoch.atomic import atomic_open
from onepoch.errors import ConfigError

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
DPI = 100


def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _series(series) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """``(label, xs, ys[, yerr])`` items as float arrays of one length."""
    out = []
    for item in series:
        if not isinstance(item, (tuple, list)) or len(item) not in (3, 4):
            raise ValueError("a series is (label, xs, ys) or (label, xs, ys, yerr)")
        label, *arrays = item
        arrays = [None if a is None else np.asarray(a, dtype=float) for a in arrays]
        if any(a is not None and (a.ndim != 1 or len(a) != len(arrays[0])) for a in arrays):
            raise ValueError(f"series {label!r}: xs, ys (and yerr) must be 1-D and of one length")
        out.append((str(label), arrays[0], arrays[1], arrays[2] if len(arrays) == 3 else None))
    return out


def line_panels_figure(panels: Sequence[dict[str, Any]], *, title: str = "", cols: int = 2,
                       panel_size: tuple[float, float] = (6.0, 3.6)):
    """One axes per panel, row by row, ``cols`` to a row. A panel is a dict with ``series`` (a list of
    ``(label, xs, ys)`` or ``(label, xs, ys, yerr)``: a line with markers, and error bars ±yerr) and
    optional ``title``, ``xlabel``, ``ylabel``, ``logy``, ``legend`` (default: with two series or
    more). A NaN point leaves a gap in its line; a panel without any finite point says "no data"."""
    if not panels:
        raise ValueError("a figure needs at least one panel")
    cols = max(1, min(cols, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(panel_size[0] * cols, panel_size[1] * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        data = _series(panel.get("series", []))
        drawn = 0
        for label, xs, ys, err in data:
            finite = int((np.isfinite(xs) & np.isfinite(ys)).sum())
            marker = "o" if finite <= 60 else None
            if err is None:
                ax.plot(xs, ys, marker=marker, markersize=4, label=label)
            else:
                ax.errorbar(xs, ys, yerr=err, marker=marker, markersize=4, capsize=3, label=label)
            drawn += finite
        if panel.get("logy") and drawn:
            ax.set_yscale("log")
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(True, alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif len(data) > 1 or (data and panel.get("legend")):
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def scatter_figure(points, labels, *, class_names: Sequence[str], title: str = "", xlabel: str = "",
                   ylabel: str = "", max_points: int = 5000, seed: int = 0):
    """2-D ``points`` (N, 2) coloured by integer class ``labels`` (N,), one legend entry per class.

    At most ``max_points`` points are drawn (a seeded random subset, in random order so that no class
    hides the others); rows with a NaN are left out. One scatter call: ``ax.collections[0]`` holds
    the points, its array the labels. The legend names the classes when there are at most 20.
    """
    pts, lab = np.asarray(points, dtype=float), np.asarray(labels)
    if pts.ndim != 2 or pts.shape[1] != 2 or lab.shape != (len(pts),):
        raise ValueError(f"points must be (N, 2) and labels (N,); got {pts.shape} and {lab.shape}")
    if len(lab) and (not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() >= len(class_names)):
        raise ValueError(f"labels must be integers in [0, {len(class_names)}) to index class_names")
    keep = np.isfinite(pts).all(axis=1)
    order = np.random.default_rng(seed).permutation(int(keep.sum()))[:max_points]
    pts, lab = pts[keep][order], lab[keep][order]
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D

    base = colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    colours = [base(i % base.N) for i in range(len(class_names))]
    fig = _figure(7.5, 6.0)
    ax = fig.subplots()
    ax.scatter(pts[:, 0], pts[:, 1], c=lab, cmap=ListedColormap(colours), vmin=-0.5,
               vmax=len(class_names) - 0.5, s=6, linewidths=0)
    if len(class_names) <= 20:
        handles = [Line2D([], [], marker="o", linestyle="", color=c, label=str(n))
                   for c, n in zip(colours, class_names)]
        ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def tile_mosaic(tiles, pad: int = 2) -> np.ndarray:
    """Tiles (rows, cols, h, w, C) with values in [0, 1] laid out with ``pad`` white pixels between
    and around them: float (rows·(h+pad)+pad, cols·(w+pad)+pad, 3); one channel is repeated to three."""
    t = np.asarray(tiles, dtype=np.float32)
    if t.ndim != 5 or t.shape[-1] not in (1, 3):
        raise ValueError(f"tiles must be (rows, cols, h, w, C) with C in (1, 3); got {t.shape}")
    if t.shape[-1] == 1:
        t = np.repeat(t, 3, axis=-1)
    rows, cols, h, w, _ = t.shape
    out = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y:y + h, x:x + w] = t[r, c]
    return np.clip(out, 0.0, 1.0)


def image_grid_figure(tiles, *, col_titles: Sequence[str] | None = None, zoom: int = 4, pad: int = 2):
    """The :func:`tile_mosaic` of ``tiles`` (rows, cols, h, w, C), drawn pixel for pixel (``zoom``
    screen pixels per image pixel, no smoothing) with ``col_titles`` above the columns."""
    t = np.asarray(tiles)
    mosaic = tile_mosaic(t, pad)
    cols, w = t.shape[1], t.shape[3]
    if col_titles is not None and len(col_titles) != cols:
        raise ValueError(f"col_titles has {len(col_titles)} entries for {cols} columns")
    from matplotlib.figure import Figure

    top = 0.45 if col_titles else 0.05  # inches above the images for the column titles
    fig = Figure(figsize=(mosaic.shape[1] * zoom / DPI, mosaic.shape[0] * zoom / DPI + top), dpi=DPI)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - top / fig.get_figheight()))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_xticks([pad + c * (w + pad) + (w - 1) / 2 for c in range(cols)],
                  [str(s) for s in col_titles] if col_titles else [""] * cols, fontsize=7)
    for side in ax.spines.values():
        side.set_visible(False)
    return fig


def figure_format(path: str | Path) -> str:
    """``png``, ``svg`` or ``pdf`` from a file's extension (ConfigError for another one)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"{path}: figures are written as .png, .svg or .pdf, not {suffix or 'no extension'!r}")
    return FORMATS[suffix]


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically in the format its extension names; return the path."""
    path = Path(path)
    fmt = figure_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Software": "onepoch"} if fmt == "png" else {"Date": None} if fmt == "svg" else None
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, dpi=DPI, metadata=metadata)
    return path
