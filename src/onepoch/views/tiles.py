"""Pictures of views: a few images, each followed by the views a recipe makes of it, as tiles
(:func:`view_tiles`) and as a figure (:func:`save_views_figure`). Used by ``onepoch views``, the run
report's ``views.png`` and the TensorBoard picture of a training run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onepoch.plots import image_grid_figure, save_figure
from onepoch.views.encoded import first_images_views
from onepoch.views.render import make_views
from onepoch.views.spec import ViewSpec, load_view_spec


def first_views(split: Any, n: int, specs: list[ViewSpec], seed: int) -> list[torch.Tensor]:
    """The views of the first ``n`` images of a prepared ``split``, per view group (count, n, C, size, size):
    raw images' from one generator seeded ``seed``, group after group; a JPEG-at-rest split's cut as
    training cuts them, from the stored photographs (:func:`onepoch.views.encoded.first_images_views`)."""
    if split.encoded:
        return first_images_views(split.images, n, specs, seed)
    images = torch.from_numpy(np.array(split.images[:n]))  # a copy: memory-mapped splits are read-only
    generator = torch.Generator().manual_seed(seed)
    return [make_views(images, spec, generator).view(spec.count, n, images.shape[-1], spec.size, spec.size)
            for spec in specs]


def column_titles(specs: list[ViewSpec]) -> list[str]:
    """The titles of the columns of :func:`view_tiles`: the image, then each group's views."""
    titles = ["image"]
    for g, spec in enumerate(specs):
        titles += [f"group {g + 1}\nview {i + 1}" if len(specs) > 1 else f"view {i + 1}" for i in range(spec.count)]
    return titles


def view_tiles(originals, groups: list[torch.Tensor]) -> np.ndarray:
    """Tiles (n, 1 + V, s, s, C) in [0, 1]: per image, the image then its views. ``originals`` uint8
    (n, H, W, C); ``groups`` float views (V_g, n, C, s_g, s_g) in [0, 1] (un-normalised), all shown at
    the largest view size s (smaller crops enlarged without smoothing, the image resized with
    antialiasing)."""
    if not isinstance(originals, torch.Tensor):
        originals = torch.from_numpy(np.array(originals))  # a copy: memory-mapped splits are read-only
    n, c = originals.shape[0], originals.shape[-1]
    size = max(g.shape[-1] for g in groups)
    tiles = [torch.nn.functional.interpolate(g.flatten(0, 1).float(), size=(size, size), mode="nearest").view(
        g.shape[0], n, c, size, size) for g in groups]
    first = originals.permute(0, 3, 1, 2).float().div(255)
    if first.shape[-1] != size:
        first = torch.nn.functional.interpolate(first, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
    columns = torch.cat([first[None], *tiles])                                   # (1 + V, n, C, s, s)
    return columns.permute(1, 0, 3, 4, 2).clamp(0, 1).numpy()


def save_views_figure(path: Path, tiles: np.ndarray, *, col_titles: list[str] | None = None,
                      zoom: int | None = None) -> Path:
    """Write :func:`view_tiles` output as a figure (one row per image: the image, then its views), each
    pixel drawn ``zoom`` times (default: tiles at least 64 px wide); PNG, SVG or PDF after ``path``."""
    zoom = zoom or max(1, math.ceil(64 / tiles.shape[2]))
    return save_figure(image_grid_figure(tiles, col_titles=col_titles, zoom=zoom), path)


def run_view_tiles(config, split, images: int = 6, views_per_group: int = 4) -> tuple[np.ndarray, list[str]]:
    """The first ``images`` images of ``split`` and up to ``views_per_group`` views of each of the
    run's view groups (``config``: a :class:`onepoch.runconfig.RunConfig`; its own generator seeded with
    ``config.seed``: the training randomness is left alone), un-normalised, as :func:`view_tiles`, with
    column titles. For a JPEG-at-rest split the views are cut as training cuts them (from the stored
    photographs); the image column is the evaluation view."""
    n = min(images, split.num_images)
    originals = torch.from_numpy(np.array(split.images[:n]))
    specs = [load_view_spec(spec, {"count": min(spec.count, views_per_group), "mean": None, "std": None})
             for spec in config.view_specs]
    return view_tiles(originals, first_views(split, n, specs, config.seed)), column_titles(specs)
