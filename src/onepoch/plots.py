"""Small dependency-free PNG charts drawn with Pillow: line plots, scatter plots, image grids, panels.

Each ``render_*`` function returns a ``PIL.Image`` in mode RGB; the matching plain function writes it
as a PNG atomically (temporary sibling, fsync, rename; see :mod:`onepoch.atomic`) and returns the path.
Bad inputs raise ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import colorsys
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from onepoch.atomic import atomic_open

# Okabe-Ito (its yellow left out: too pale on white, black made grey), then Paul Tol's "muted" colours.
PALETTE = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (213, 94, 0), (204, 121, 167), (86, 180, 233),
           (90, 90, 90), (136, 34, 85), (153, 153, 51), (51, 34, 136), (68, 170, 153), (221, 204, 119)]
MARKERS = ("o", "s", "^", "D")
BACKGROUND, INK, GRID, FRAME = (255, 255, 255), (30, 30, 30), (228, 228, 228), (120, 120, 120)
MAX_MARKED_POINTS = 60  # a series with more points is drawn as a line only
PAD = 10


def colour(i: int) -> tuple[int, int, int]:
    """The ``i``-th series colour: the palette, then well-spread hues."""
    if i < len(PALETTE):
        return PALETTE[i]
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.7, 0.8)
    return round(r * 255), round(g * 255), round(b * 255)


# Text -----------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a single small bitmap font
        return ImageFont.load_default()


_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))


def _size(text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = _MEASURE.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _line_height(font) -> int:
    return _size("Ag190", font)[1]


def _fit(text: str, font, width: float) -> str:
    """``text``, cut short with "..." if wider than ``width`` pixels."""
    if _size(text, font)[0] <= width:
        return text
    while text and _size(text + "...", font)[0] > width:
        text = text[:-1]
    return text + "..."


def _put(draw, text: str, x: float, y: float, font, ha: str = "left", va: str = "top", fill=INK) -> None:
    """Draw ``text`` with its bounding box aligned at (x, y): ha in left/center/right, va in top/center/bottom."""
    if not text:
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x -= {"left": 0, "center": (right - left) / 2, "right": right - left}[ha]
    y -= {"top": 0, "center": (bottom - top) / 2, "bottom": bottom - top}[va]
    draw.text((round(x - left), round(y - top)), text, font=font, fill=fill)


def _put_vertical(image: Image.Image, text: str, cx: float, cy: float, font) -> None:
    """Draw ``text`` turned 90 degrees anticlockwise, centred at (cx, cy)."""
    if not text:
        return
    w, h = _size(text, font)
    tile = Image.new("L", (w + 2, h + 2), 0)
    _put(ImageDraw.Draw(tile), text, 1, 1, font, fill=255)
    tile = tile.rotate(90, expand=True)
    image.paste(INK, (round(cx - tile.width / 2), round(cy - tile.height / 2)), tile)


# Axes -----------------------------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Multiples of a 1, 2 or 5 x 10^k step inside [lo, hi], at most ``max_ticks + 1`` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"nice_ticks needs finite lo <= hi; got {lo}, {hi}")
    if hi == lo:
        return [lo]
    raw = (hi - lo) / max(1, max_ticks)
    step = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * step >= raw * (1 - 1e-9):
            step *= m
            break
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [k * step + 0.0 for k in range(first, last + 1)]


def _log_ticks(lo: float, hi: float, max_ticks: int) -> list[float]:
    """Tick values for a log axis spanning 10^lo .. 10^hi: 1, 2, 5 x 10^k, else powers of ten."""
    ticks = [m * 10.0 ** k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)
             if lo - 1e-9 <= math.log10(m) + k <= hi + 1e-9]
    if 2 <= len(ticks) <= max_ticks + 1:
        return ticks
    decades = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
    if len(decades) >= 2:
        return [10.0 ** k for k in decades[:: math.ceil(len(decades) / max_ticks)]]
    return [v for v in nice_ticks(10.0 ** lo, 10.0 ** hi, max_ticks) if v > 0]


def _label(v: float, step: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6 or abs(v) < 1e-4:
        return f"{v:.3g}"
    return f"{v:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"


class _Axis:
    """One axis: its range in plotting units (log10 of the values on a log axis) and its ticks."""

    def __init__(self, values: np.ndarray, log: bool):
        self.log = log
        v = self.usable(values)
        v = np.log10(v) if log else v
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
        span = hi - lo
        if span <= 1e-12 * max(1.0, abs(lo)):
            pad = 0.5 if log else (abs(lo) * 0.1 or 1.0)
        else:
            pad = 0.05 * span
        self.lo, self.hi = lo - pad, hi + pad

    def usable(self, values: np.ndarray) -> np.ndarray:
        """The values that can be drawn on this axis (finite, and positive on a log axis)."""
        values = values[np.isfinite(values)]
        return values[values > 0] if self.log else values

    def frac(self, values) -> np.ndarray:
        """Where ``values`` lie along the axis, 0 at the start and 1 at the end."""
        v = np.asarray(values, dtype=float)
        if self.log:
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), -np.inf)
        return (v - self.lo) / (self.hi - self.lo)

    def ticks(self, max_ticks: int) -> list[tuple[float, str]]:
        if self.log:
            return [(t, f"{t:g}") for t in _log_ticks(self.lo, self.hi, max_ticks)]
        ticks = nice_ticks(self.lo, self.hi, max_ticks)
        step = ticks[1] - ticks[0] if len(ticks) > 1 else abs(ticks[0]) or 1.0
        return [(t, _label(t, step)) for t in ticks]


def _check_size(size: Sequence[int], least: tuple[int, int] = (160, 120)) -> tuple[int, int]:
    try:
        w, h = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height); got {size!r}") from None
    if w < least[0] or h < least[1]:
        raise ValueError(f"size must be at least {least[0]}x{least[1]} pixels; got {w}x{h}")
    return w, h


def _axes(size, title, xlabel, ylabel, xaxis: _Axis, yaxis: _Axis, right: int = 0):
    """A white image with the title, axis labels, grid, ticks and frame drawn.

    Returns (image, draw, box, to_px) where box = (x0, y0, x1, y1) is the plotting area and
    ``to_px(xs, ys)`` maps data values to pixel coordinates. The layout does not depend on whether
    the title or labels are empty, so plots of one kind line up.
    """
    w, h = size
    title_font, label_font, tick_font = _font(16), _font(13), _font(11)
    tick_h, tick_len = _line_height(tick_font), 4
    y0 = PAD + _line_height(title_font) + PAD
    y1 = h - (PAD + _line_height(label_font) + 6 + tick_h + tick_len + 3)
    yticks = yaxis.ticks(max(2, (y1 - y0) // 45))
    ytick_w = max(_size(s, tick_font)[0] for _, s in yticks)
    x0 = PAD + _line_height(label_font) + 8 + ytick_w + tick_len + 3
    x1 = w - right - 2 * PAD
    if x1 - x0 < 40 or y1 - y0 < 40:
        raise ValueError(f"size {w}x{h} is too small for this plot")
    max_x = max(2, (x1 - x0) // 70)
    xticks = xaxis.ticks(max_x)
    while max_x > 2 and len(xticks) * (max(_size(s, tick_font)[0] for _, s in xticks) + 12) > x1 - x0:
        max_x -= 1
        xticks = xaxis.ticks(max_x)

    def to_px(xs, ys):
        return x0 + xaxis.frac(xs) * (x1 - x0), y1 - yaxis.frac(ys) * (y1 - y0)

    image = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for value, text in xticks:
        px = round(float(to_px([value], [0.0])[0][0]))
        draw.line([(px, y0), (px, y1)], fill=GRID)
        draw.line([(px, y1), (px, y1 + tick_len)], fill=FRAME)
        _put(draw, text, px, y1 + tick_len + 3, tick_font, ha="center")
    for value, text in yticks:
        py = round(float(to_px([0.0], [value])[1][0]))
        draw.line([(x0, py), (x1, py)], fill=GRID)
        draw.line([(x0 - tick_len, py), (x0, py)], fill=FRAME)
        _put(draw, text, x0 - tick_len - 3, py, tick_font, ha="right", va="center")
    draw.rectangle([x0, y0, x1, y1], outline=FRAME)
    cx = (x0 + x1) / 2
    room = 2 * min(cx - PAD, w - PAD - cx)  # text centred on the plotting area stays inside the image
    _put(draw, _fit(title, title_font, room), cx, PAD, title_font, ha="center")
    _put(draw, _fit(xlabel, label_font, room), cx, h - PAD, label_font, ha="center", va="bottom")
    _put_vertical(image, _fit(ylabel, label_font, y1 - y0 + 2 * PAD), PAD + _line_height(label_font) / 2,
                  (y0 + y1) / 2, label_font)
    return image, draw, (x0, y0, x1, y1), to_px


def _marker(draw, x: float, y: float, shape: str, fill, r: float = 4) -> None:
    if shape == "s":
        draw.rectangle([x - r + 1, y - r + 1, x + r - 1, y + r - 1], fill=fill)
    elif shape == "^":
        draw.polygon([(x, y - r - 1), (x - r, y + r - 1), (x + r, y + r - 1)], fill=fill)
    elif shape == "D":
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=fill)
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _legend_size(labels: list[str], font) -> tuple[int, int]:
    return 34 + max(_size(s, font)[0] for s in labels) + 8, len(labels) * (_line_height(font) + 6) + 6


def _legend(draw, x: float, y: float, entries: list[tuple[str, Any, str | None]], font, line: bool) -> None:
    """A framed legend with its top-left corner at (x, y); entries are (label, colour, marker)."""
    w, h = _legend_size([e[0] for e in entries], font)
    draw.rectangle([x, y, x + w, y + h], fill=BACKGROUND, outline=FRAME)
    step = _line_height(font) + 6
    for i, (text, fill, shape) in enumerate(entries):
        cy = y + 6 + i * step + _line_height(font) / 2
        if line and fill:
            draw.line([(x + 6, cy), (x + 28, cy)], fill=fill, width=2)
        if shape:
            _marker(draw, x + 17, cy, shape, fill)
        _put(draw, text, x + 34, cy, font, va="center", fill=INK if fill else FRAME)


# Line plots -----------------------------------------------------------------------------------------

def _as_series(series) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    out = []
    for i, s in enumerate(series):
        if not isinstance(s, (tuple, list)) or len(s) not in (3, 4):
            raise ValueError(f"series {i} must be (label, xs, ys) or (label, xs, ys, yerr)")
        label, arrays = str(s[0]), []
        for name, values in zip(("xs", "ys", "yerr"), s[1:]):
            try:
                a = np.asarray(values, dtype=float)
            except (TypeError, ValueError):
                raise ValueError(f"series {label!r}: {name} must be a sequence of numbers") from None
            if a.ndim != 1:
                raise ValueError(f"series {label!r}: {name} must be one-dimensional; got shape {a.shape}")
            if len(a) != len(arrays[0] if arrays else a):
                raise ValueError(f"series {label!r}: {name} has {len(a)} values but xs has {len(arrays[0])}")
            arrays.append(a)
        out.append((label, arrays[0], arrays[1], arrays[2] if len(arrays) == 3 else None))
    return out


def render_line_plot(series, *, title: str = "", xlabel: str = "", ylabel: str = "", logx: bool = False,
                     logy: bool = False, size: tuple[int, int] = (800, 500)) -> Image.Image:
    """Lines with markers (and error bars for a ``yerr``) for each ``(label, xs, ys[, yerr])`` series.

    Points with a NaN (or, on a log axis, a non-positive) coordinate are skipped; a series with no
    drawable point is listed in the legend as "(no data)"; with none at all the axes say "no data".
    """
    size = _check_size(size)
    data = []
    for label, xs, ys, err in _as_series(series):
        keep = np.isfinite(xs) & np.isfinite(ys) & (xs > 0 if logx else True) & (ys > 0 if logy else True)
        err = None if err is None else np.abs(err[keep])
        data.append((label, xs[keep], ys[keep], err))
    all_x = np.concatenate([d[1] for d in data] or [np.zeros(0)])
    all_y = np.concatenate([d[2] for d in data] + [d[2] + d[3] for d in data if d[3] is not None]
                           + [d[2] - d[3] for d in data if d[3] is not None] or [np.zeros(0)])
    xaxis, yaxis = _Axis(all_x, logx), _Axis(all_y, logy)
    image, draw, box, to_px = _axes(size, title, xlabel, ylabel, xaxis, yaxis)
    x0, y0, x1, y1 = box
    if all_x.size == 0:
        _put(draw, "no data", (x0 + x1) / 2, (y0 + y1) / 2, _font(14), ha="center", va="center", fill=FRAME)
        return image
    samples = []  # pixel positions along the curves, to place the legend where it hides least
    for i, (label, xs, ys, err) in enumerate(data):
        fill, shape = colour(i), MARKERS[i % len(MARKERS)]
        px, py = to_px(xs, ys)
        if err is not None:
            _, lo = to_px(xs, ys - err)
            _, hi = to_px(xs, ys + err)
            for x, a, b in zip(px, np.nan_to_num(lo, nan=y1, posinf=y1, neginf=y1), hi):
                if math.isfinite(b):
                    a, b = min(max(a, y0), y1), min(max(b, y0), y1)
                    draw.line([(x, a), (x, b)], fill=fill, width=1)
                    draw.line([(x - 4, a), (x + 4, a)], fill=fill)
                    draw.line([(x - 4, b), (x + 4, b)], fill=fill)
        points = list(zip(px.tolist(), py.tolist()))
        if len(points) > 1:
            draw.line(points, fill=fill, width=2, joint="curve")
        if len(points) <= MAX_MARKED_POINTS:
            for x, y in points:
                _marker(draw, x, y, shape, fill)
        for (ax, ay), (bx, by) in zip(points, points[1:] or points):
            samples += [(ax + (bx - ax) * t, ay + (by - ay) * t) for t in np.linspace(0, 1, 8)]
    labels = [label if len(xs) else f"{label} (no data)" for label, xs, _, _ in data]
    font = _font(12)
    lw, lh = _legend_size(labels, font)
    if lw < (x1 - x0) - 16 and lh < (y1 - y0) - 16:
        corners = [(x1 - lw - 8, y0 + 8), (x0 + 8, y0 + 8), (x1 - lw - 8, y1 - lh - 8), (x0 + 8, y1 - lh - 8)]
        pts = np.array(samples).reshape(-1, 2)
        hidden = [int(((pts[:, 0] >= cx) & (pts[:, 0] <= cx + lw) & (pts[:, 1] >= cy) & (pts[:, 1] <= cy + lh)).sum())
                  for cx, cy in corners]
        cx, cy = corners[hidden.index(min(hidden))]
        entries = [(s, colour(i) if len(d[1]) else None,
                    MARKERS[i % len(MARKERS)] if 0 < len(d[1]) <= MAX_MARKED_POINTS else None)
                   for i, (s, d) in enumerate(zip(labels, data))]
        _legend(draw, cx, cy, entries, font, line=True)
    return image


def line_plot(path, series, *, title: str = "", xlabel: str = "", ylabel: str = "", logx: bool = False,
              logy: bool = False, size: tuple[int, int] = (800, 500)) -> Path:
    """Write :func:`render_line_plot` as a PNG at ``path``; return the path."""
    return save_png(render_line_plot(series, title=title, xlabel=xlabel, ylabel=ylabel, logx=logx, logy=logy,
                                     size=size), path)


# Scatter plots --------------------------------------------------------------------------------------

def render_scatter_plot(points, labels, *, class_names: Sequence[str], title: str = "", xlabel: str = "",
                        ylabel: str = "", size: tuple[int, int] = (700, 700), max_points: int = 5000,
                        seed: int = 0) -> Image.Image:
    """2-D ``points`` (N, 2) coloured by integer class ``labels`` (N,), with a legend of class names.

    At most ``max_points`` points are drawn (a seeded random subset), in a random order so that no
    class hides the others. Points with a NaN coordinate are skipped.
    """
    size = _check_size(size)
    pts, lab = np.asarray(points, dtype=float), np.asarray(labels)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2); got {pts.shape}")
    if lab.shape != (len(pts),):
        raise ValueError(f"labels must have shape ({len(pts)},) to match points; got {lab.shape}")
    if not class_names:
        raise ValueError("class_names must not be empty")
    if len(lab) and (not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() >= len(class_names)):
        raise ValueError(f"labels must be integers in [0, {len(class_names)}) to index class_names")
    if max_points < 1:
        raise ValueError(f"max_points must be positive; got {max_points}")
    keep = np.isfinite(pts).all(axis=1)
    pts, lab = pts[keep], lab[keep]
    order = np.random.default_rng(seed).permutation(len(pts))[:max_points]
    pts, lab = pts[order], lab[order]

    font = _font(12)
    names = [_fit(str(n), font, size[0] * 0.3) for n in class_names]
    rows = max(1, (size[1] - 80) // (_line_height(font) + 6) - 1)
    entries = [(n, colour(c), "o") for c, n in enumerate(names)]
    if len(entries) > rows:
        entries = entries[: rows - 1] + [(f"+ {len(entries) - rows + 1} more", None, None)]
    lw, _ = _legend_size([e[0] for e in entries], font)
    image, draw, box, to_px = _axes(size, title, xlabel, ylabel, _Axis(pts[:, 0], False), _Axis(pts[:, 1], False),
                                    right=lw + PAD)
    x0, y0, x1, y1 = box
    if len(pts) == 0:
        _put(draw, "no data", (x0 + x1) / 2, (y0 + y1) / 2, _font(14), ha="center", va="center", fill=FRAME)
    px, py = to_px(pts[:, 0], pts[:, 1])
    for x, y, c in zip(px.tolist(), py.tolist(), lab.tolist()):
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour(c))
    _legend(draw, x1 + PAD, y0, entries, font, line=False)
    return image


def scatter_plot(path, points, labels, *, class_names: Sequence[str], title: str = "", xlabel: str = "",
                 ylabel: str = "", size: tuple[int, int] = (700, 700), max_points: int = 5000, seed: int = 0) -> Path:
    """Write :func:`render_scatter_plot` as a PNG at ``path``; return the path."""
    return save_png(render_scatter_plot(points, labels, class_names=class_names, title=title, xlabel=xlabel,
                                        ylabel=ylabel, size=size, max_points=max_points, seed=seed), path)


# Image grids ----------------------------------------------------------------------------------------

def _as_uint8_images(images) -> np.ndarray:
    """(N, H, W, 3) uint8 from uint8 or [0, 1] float images (N, H, W, C), C in (1, 3), or (N, H, W)."""
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3) or 0 in a.shape:
        raise ValueError(f"images must have shape (N, H, W, C) with C in (1, 3) and N, H, W > 0; got {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < -1e-3 or a.max() > 1 + 1e-3:
            raise ValueError("float images must be finite and in [0, 1]")
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    elif a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise ValueError("integer images must be in [0, 255]")
        a = a.astype(np.uint8) * (255 if a.dtype == np.bool_ else 1)
    else:
        raise ValueError(f"images must be uint8 or float in [0, 1]; got dtype {a.dtype}")
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def _wrap(text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and _size(f"{lines[-1]} {word}", font)[0] <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def render_image_grid(images, *, rows: int | None = None, cols: int | None = None, scale: int = 1, pad: int = 2,
                      titles: Sequence[str] | None = None, col_titles: Sequence[str] | None = None) -> Image.Image:
    """``images`` (N, H, W, C) laid out row by row in a grid, each scaled up ``scale`` times (nearest).

    ``rows`` and ``cols`` default to a near-square grid; ``titles`` label the rows (on the left) and
    ``col_titles`` the columns (on top, wrapped at spaces).
    """
    a = _as_uint8_images(images)
    n, h, w, _ = a.shape
    if int(scale) != scale or scale < 1 or int(pad) != pad or pad < 0:
        raise ValueError(f"scale must be an integer >= 1 and pad an integer >= 0; got {scale}, {pad}")
    scale, pad = int(scale), int(pad)
    if rows is None and cols is None:
        cols = math.ceil(math.sqrt(n))
    if rows is None:
        rows = math.ceil(n / cols) if cols and cols > 0 else 0
    if cols is None:
        cols = math.ceil(n / rows) if rows > 0 else 0
    if rows < 1 or cols < 1 or rows * cols < n:
        raise ValueError(f"a {rows} x {cols} grid cannot hold {n} images")
    if titles is not None and len(titles) != rows:
        raise ValueError(f"titles has {len(titles)} entries for {rows} rows")
    if col_titles is not None and len(col_titles) != cols:
        raise ValueError(f"col_titles has {len(col_titles)} entries for {cols} columns")
    font, th, tw = _font(12), h * scale, w * scale
    line_h = _line_height(font) + 2
    cell_w = max([tw] + [_size(word, font)[0] for t in col_titles or [] for word in str(t).split()])
    wrapped = [_wrap(str(t), font, cell_w) for t in col_titles or []]
    top = (max(len(lines) for lines in wrapped) * line_h + pad + 2) if wrapped else 0
    left = (max(_size(str(t), font)[0] for t in titles) + 2 * pad + 4) if titles else 0
    image = Image.new("RGB", (left + cols * cell_w + (cols + 1) * pad, top + rows * th + (rows + 1) * pad), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(a[i]).resize((tw, th), Image.Resampling.NEAREST)
        image.paste(tile, (left + pad + c * (cell_w + pad) + (cell_w - tw) // 2, top + pad + r * (th + pad)))
    for c, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            _put(draw, line, left + pad + c * (cell_w + pad) + cell_w / 2, 2 + k * line_h, font, ha="center")
    for r, text in enumerate(titles or []):
        _put(draw, str(text), left - pad - 2, top + pad + r * (th + pad) + th / 2, font, ha="right", va="center")
    return image


def image_grid(path, images, *, rows: int | None = None, cols: int | None = None, scale: int = 1, pad: int = 2,
               titles: Sequence[str] | None = None, col_titles: Sequence[str] | None = None) -> Path:
    """Write :func:`render_image_grid` as a PNG at ``path``; return the path."""
    return save_png(render_image_grid(images, rows=rows, cols=cols, scale=scale, pad=pad, titles=titles,
                                      col_titles=col_titles), path)


# Panels and saving ----------------------------------------------------------------------------------

def multi_panel(path, panels: Sequence[dict | Image.Image], *, cols: int = 2, panel_size: tuple[int, int] = (600, 400),
                title: str = "") -> Path:
    """Several plots in one PNG, row by row: each panel is a dict of :func:`render_line_plot` keyword
    arguments (``series``, ``title``, ``xlabel``, ...; ``size`` defaults to ``panel_size``) or an image."""
    if not panels:
        raise ValueError("multi_panel needs at least one panel")
    if cols < 1:
        raise ValueError(f"cols must be >= 1; got {cols}")
    rendered = []
    for p in panels:
        if isinstance(p, Image.Image):
            rendered.append(p.convert("RGB"))
        elif isinstance(p, dict):
            rendered.append(render_line_plot(**{"size": panel_size, **p}))
        else:
            raise ValueError(f"a panel must be a dict of render_line_plot arguments or a PIL image; got {type(p)}")
    cols = min(cols, len(rendered))
    rows = math.ceil(len(rendered) / cols)
    pw, ph = max(im.width for im in rendered), max(im.height for im in rendered)
    top = PAD + _line_height(_font(18)) + PAD if title else 0
    image = Image.new("RGB", (cols * pw, top + rows * ph), BACKGROUND)
    for i, im in enumerate(rendered):
        r, c = divmod(i, cols)
        image.paste(im, (c * pw, top + r * ph))
    _put(ImageDraw.Draw(image), _fit(title, _font(18), image.width - 2 * PAD), image.width / 2, PAD, _font(18),
         ha="center")
    return save_png(image, path)


def save_png(image: Image.Image, path) -> Path:
    """Write ``image`` (converted to RGB) as a PNG at ``path`` atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        image.convert("RGB").save(f, format="PNG")
    return path
