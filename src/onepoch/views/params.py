"""The random parameters of views: :func:`sample_view_params` draws every view's crop box, flip, colour
factors, grayscale, blur sigma and solarize from one ``torch.rand`` call, then derives them on the host, so
that a CPU generator with the same seed gives the same views on every device; :class:`ViewParams` holds
them. Semantics of torchvision's ``RandomResizedCrop`` (10 tries, then a centre crop) and ``ColorJitter``."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from onepoch.views.spec import ViewSpec

CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 times before falling back to a centre crop


@dataclass
class ViewParams:
    """Per-view random parameters for ``N = count * batch`` views (row ``v*B + b``).

    ``crop`` is ``(N, 4)`` int64 ``top, left, height, width`` in source pixels. Factors hold the
    identity value (1, or 0 for hue) where the op is not applied.
    """

    image_index: torch.Tensor  # (N,) int64, source image of each view
    crop: torch.Tensor  # (N, 4) int64
    flip: torch.Tensor  # (N,) bool
    brightness: torch.Tensor  # (N,) float
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    grayscale: torch.Tensor  # (N,) bool
    blur_sigma: torch.Tensor  # (N,) float, 0 = no blur
    solarize: torch.Tensor  # (N,) bool

    def to(self, device: torch.device | str) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    def rows(self, index: slice | torch.Tensor) -> "ViewParams":
        """The parameters of the views ``index`` (a slice or index tensor of rows); ``image_index`` is kept."""
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def concat_view_params(params: list[ViewParams], batch_sizes: list[int]) -> ViewParams:
    """The views of several batches as one: ``params[k]`` describes views of batch k (``batch_sizes[k]``
    images); in the result its ``image_index`` points into the batches stacked in order, so that
    ``apply_view_params(torch.cat(batches), concat_view_params(...))`` renders every batch's views in
    one call, the rows of batch k following those of batch k-1."""
    offsets = np.cumsum([0] + list(batch_sizes[:-1]))
    parts = {f.name: [getattr(p, f.name) for p in params] for f in fields(ViewParams)}
    parts["image_index"] = [p.image_index + int(o) for p, o in zip(params, offsets)]
    return ViewParams(**{name: torch.cat(values) for name, values in parts.items()})


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (e.g. (seed, step, group)) through numpy's
    SeedSequence, so that nearby keys give unrelated streams."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# Columns of the one uniform draw per view (fixed layout: changing one op's probability never
# shifts another op's random numbers).
_U_AREA = slice(0, CROP_TRIES)
_U_RATIO = slice(CROP_TRIES, 2 * CROP_TRIES)
_U_TOP, _U_LEFT, _U_FLIP, _U_JITTER = 2 * CROP_TRIES, 2 * CROP_TRIES + 1, 2 * CROP_TRIES + 2, 2 * CROP_TRIES + 3
_U_B, _U_C, _U_S, _U_H = range(2 * CROP_TRIES + 4, 2 * CROP_TRIES + 8)
_U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLAR = range(2 * CROP_TRIES + 8, 2 * CROP_TRIES + 12)
_U_COLUMNS = 2 * CROP_TRIES + 12


def _sample_crops(u: np.ndarray, spec: ViewSpec, height: np.ndarray | int, width: np.ndarray | int) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, vectorised: up to 10 tries of (area, log-ratio)
    per view; the first that fits wins, else a centre crop with the ratio clamped into range.
    ``height``/``width``: the source size, one for all views or one per view (N,).
    Returns (N, 4) int64 ``top, left, height, width``."""
    n = u.shape[0]
    height = np.broadcast_to(np.asarray(height, np.int64), (n,))
    width = np.broadcast_to(np.asarray(width, np.int64), (n,))
    s_lo, s_hi = spec.crop_scale
    lr_lo, lr_hi = math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1])
    if s_lo == s_hi and lr_lo == lr_hi:  # a fixed crop size (EMP-SSL): every try draws the same box
        u_area, u_ratio = u[:1, _U_AREA], u[:1, _U_RATIO]
    else:
        u_area, u_ratio = u[:, _U_AREA], u[:, _U_RATIO]
    hh, ww = height[:, None], width[:, None]
    target = hh * ww * (s_lo + (s_hi - s_lo) * u_area.astype(np.float64))
    aspect = np.exp(lr_lo + (lr_hi - lr_lo) * u_ratio.astype(np.float64))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)  # round half to even, like Python's round
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= ww) & (h > 0) & (h <= hh)
    first = fits.argmax(1)[:, None]
    found = fits.any(1)
    w = np.take_along_axis(w, first, 1)[:, 0]
    h = np.take_along_axis(h, first, 1)[:, 0]
    # Fallback: the whole image, cropped to the nearest allowed aspect ratio.
    in_ratio = width / height
    fw = np.where(in_ratio > spec.crop_ratio[1], np.round(height * spec.crop_ratio[1]), width).astype(np.int64)
    fh = np.where(in_ratio < spec.crop_ratio[0], np.round(width / spec.crop_ratio[0]), height).astype(np.int64)
    w = np.where(found, w, fw)
    h = np.where(found, h, fh)
    top = np.minimum(np.floor(u[:, _U_TOP] * (height - h + 1)).astype(np.int64), height - h)
    left = np.minimum(np.floor(u[:, _U_LEFT] * (width - w + 1)).astype(np.int64), width - w)
    top = np.where(found, top, (height - h) // 2)
    left = np.where(found, left, (width - w) // 2)
    return np.stack([top, left, h, w], 1)


def _factor(u: np.ndarray, strength: float, applied: np.ndarray) -> np.ndarray:
    """Uniform factor in [max(0, 1-s), 1+s] where applied, 1 elsewhere."""
    if strength == 0:
        return np.ones_like(u)
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return np.where(applied, lo + (hi - lo) * u, np.float32(1)).astype(np.float32)


def sample_view_params(spec: ViewSpec, batch_size: int, height: int | np.ndarray, width: int | np.ndarray,
                       generator: torch.Generator | None = None) -> ViewParams:
    """Draw the parameters of ``spec.count * batch_size`` views of ``height x width`` images (one
    size for all, or arrays of ``batch_size`` sizes for images of different sizes).

    All randomness is one ``torch.rand`` call with ``generator`` (on its device); the parameters
    are then derived on the host, so a CPU generator with the same seed gives the same views on
    every device. The result lives on the CPU.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    n = spec.count * batch_size
    u = torch.rand(n, _U_COLUMNS, generator=generator, device=device).cpu().numpy()
    jitter = u[:, _U_JITTER] < spec.jitter_p
    blur = u[:, _U_BLUR] < spec.blur_p
    s_lo, s_hi = spec.blur_sigma
    zeros = np.zeros(n, np.float32)
    arrays = dict(
        image_index=np.tile(np.arange(batch_size, dtype=np.int64), spec.count),
        crop=_sample_crops(u, spec, np.tile(np.asarray(height), spec.count) if np.ndim(height) else height,
                           np.tile(np.asarray(width), spec.count) if np.ndim(width) else width),
        flip=u[:, _U_FLIP] < spec.flip_p,
        brightness=_factor(u[:, _U_B], spec.brightness, jitter),
        contrast=_factor(u[:, _U_C], spec.contrast, jitter),
        saturation=_factor(u[:, _U_S], spec.saturation, jitter),
        hue=np.where(jitter, spec.hue * (2 * u[:, _U_H] - 1), zeros).astype(np.float32),
        grayscale=u[:, _U_GRAY] < spec.grayscale_p,
        blur_sigma=np.where(blur, s_lo + (s_hi - s_lo) * u[:, _U_SIGMA], zeros).astype(np.float32),
        solarize=u[:, _U_SOLAR] < spec.solarize_p,
    )
    return ViewParams(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def rank_view_params(spec: ViewSpec, n: int, heights: Any, widths: Any, generator: torch.Generator, *,
                     rank: int = 0, world_size: int = 1) -> ViewParams:
    """The parameters of this rank's views: drawn for the global batch of ``n * world_size`` images
    (``heights``/``widths``: one size, or the global batch's sizes), then rank ``rank``'s rows
    ``v*B + rank*n + (0..n-1)`` of every view v, ``image_index`` counted from this rank's first image."""
    full = sample_view_params(spec, n * world_size, heights, widths, generator)
    if world_size > 1:
        rows = (torch.arange(spec.count).view(-1, 1) * n * world_size + rank * n + torch.arange(n)).flatten()
        full = full.rows(rows)
        full.image_index -= rank * n
    return full
