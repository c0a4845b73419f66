"""Rendering views: ``apply_view_params(images, params, spec)`` turns a uint8 (or float) batch
``(B, H, W, C)`` and the views' random parameters into float views ``(N, C, size, size)``;
``make_views(images, spec, generator)`` draws the parameters and renders them, **patch-major**: rows
``v*B .. v*B+B-1`` are view ``v`` of every image.

A plan is made on the host from the parameters (rows to crop from, resampling matrices, factors, which
views are gray, blurred, solarized), moved to the images' device in one copy per dtype, then the views
are rendered in chunks by a handful of batched tensor kernels (no per-sample Python loop, no PIL):

* random resized crop + horizontal flip + resize: the crop window is gathered from the image (or from
  its mirror image, for a flipped view) and resized by two matrix products, ``out_c = Wy @ crop_c @ Wx^T``
  (:mod:`onepoch.views.ops`); on CPU, large uint8 crops are resized one view at a time instead;
* colour jitter (brightness, contrast, saturation, hue), grayscale, blur, solarize, normalize: the
  batched ops of :mod:`onepoch.views.ops`, or on CPU, with numba installed, for RGB views, the fused
  kernels of :mod:`onepoch.views.kernels` (one pass per view, the same results up to float rounding).

The four jitter ops are applied in the fixed order brightness, contrast, saturation, hue rather than in
torchvision's random order per image (brightness, contrast and saturation commute exactly before
clamping). Rendering on a GPU needs no device-to-host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from onepoch.views import kernels
from onepoch.views.ops import (
    Scratch,
    adjust_contrast_,
    adjust_hue_,
    adjust_saturation_,
    apply_rows_,
    axis_matrices,
    blur,
    gaussian_kernels,
    grayscale,
    one_torch_thread,
    resize_view,
    solarize,
    thread_scratch,
)
from onepoch.views.params import ViewParams, sample_view_params
from onepoch.views.spec import ViewSpec


@dataclass
class _Plan:
    """Everything the kernels need, decided on the host from CPU parameters, so that rendering on
    a GPU needs no device-to-host synchronisation and one host-to-device copy per dtype."""

    source: torch.Tensor  # (N,) row of the stacked [images, mirrored images] to crop from
    tops: torch.Tensor  # (N,)
    lefts: torch.Tensor  # (N,) in the (possibly mirrored) source
    wy: torch.Tensor  # (U, size, Kh) resampling along the height, one per distinct crop height
    wy_index: torch.Tensor | None  # (N,) row of wy; None: all views share wy[0]
    wx: torch.Tensor  # (U', Kw, size) resampling along the width (transposed)
    wx_index: torch.Tensor | None
    gain: torch.Tensor  # (N,) brightness / 255 for uint8 input
    contrast: torch.Tensor  # (N,)
    saturation: torch.Tensor  # (N,)
    hue: torch.Tensor  # (N,)
    grayscale: torch.Tensor  # (k,) sorted indices of the views turned gray
    blur: torch.Tensor  # (k,) sorted indices of the blurred views
    blur_sigma: torch.Tensor  # (k,) their sigmas
    solarize: torch.Tensor  # (k,) sorted indices of the solarized views

    def to(self, device: torch.device) -> "_Plan":
        """Move every tensor with one copy per dtype (pinned + non-blocking on CUDA)."""
        if device.type == "cpu":
            return self
        names = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        moved: dict[str, torch.Tensor | None] = {f.name: None for f in fields(self)}
        for dtype in (torch.float32, torch.int64):
            group = [n for n in names if getattr(self, n).dtype == dtype]
            flat = torch.cat([getattr(self, n).reshape(-1) for n in group])
            flat = flat.pin_memory().to(device, non_blocking=True)
            for n, part in zip(group, flat.split([getattr(self, n).numel() for n in group])):
                moved[n] = part.view(getattr(self, n).shape)
        return _Plan(**moved)


def _make_plan(p: ViewParams, spec: ViewSpec, batch_size: int, width: int, scale: float,
               matrices: bool = True) -> _Plan:
    """Derive the kernels' inputs from CPU parameters (numpy: cheap for ~10^4 views); ``matrices``:
    also the resampling matrices (not needed when each view is resized on its own)."""
    crop = p.crop.numpy()
    tops, lefts, hs, ws = crop.T
    flip = p.flip.numpy()
    if matrices:
        wy, wy_index = axis_matrices(hs, spec.size, spec.interpolation)
        wx, wx_index = axis_matrices(ws, spec.size, spec.interpolation)
    else:
        wy = wx = torch.zeros(1, 1, 1)
        wy_index = wx_index = None
    sigma = p.blur_sigma.numpy()

    def rows(mask: torch.Tensor, prob: float) -> torch.Tensor:
        return torch.from_numpy(np.flatnonzero(mask.numpy()) if prob > 0 else np.zeros(0, np.int64))

    blur = rows(p.blur_sigma > 0, spec.blur_p)
    return _Plan(
        source=torch.from_numpy(p.image_index.numpy() + batch_size * flip),
        tops=torch.from_numpy(np.ascontiguousarray(tops)),
        # a flipped view takes the mirrored crop from the mirrored image
        lefts=torch.from_numpy(np.where(flip, width - lefts - ws, lefts)),
        wy=wy, wy_index=wy_index, wx=wx.transpose(1, 2).contiguous(), wx_index=wx_index,
        gain=torch.from_numpy((p.brightness.numpy() * scale).astype(np.float32)),
        contrast=p.contrast, saturation=p.saturation, hue=p.hue,
        grayscale=rows(p.grayscale, spec.grayscale_p),
        blur=blur,
        blur_sigma=torch.from_numpy(sigma[blur.numpy()]),
        solarize=rows(p.solarize, spec.solarize_p),
    )

# On CPU, uint8 views whose crops are larger than this (in pixels, either side) are resized one at a
# time by torch's antialiased uint8 interpolation instead of dense resampling matrices, whose cost grows
# with the crop's side (an ImageNet crop of ~250 pixels: ~80 MFLOP per 224x224 view, against ~0.4 ms).
PER_VIEW_RESIZE_ABOVE = 64


def _resize_views(src: torch.Tensor, host: ViewParams, rows: range, size: int, mode: str) -> torch.Tensor:
    """The views ``rows`` cropped from uint8 ``src`` (B, C, H, W) and resized to ``size`` one at a time with
    antialiasing (a uint8 result, as Pillow's resize gives: within 1-3 levels of it on photographs), the
    flipped ones mirrored after resizing (the same as resizing the mirrored crop); returns (m, C, size, size)
    uint8."""
    crop, image, flip = host.crop.numpy(), host.image_index.numpy(), host.flip.numpy()
    with one_torch_thread():  # each call is a fraction of a millisecond: threads would only synchronise
        return torch.cat([resize_view(src[image[j]:image[j] + 1], crop[j], bool(flip[j]), size, mode)
                          for j in rows])


def _resize_dense(windows: torch.Tensor, plan: _Plan, s: int, e: int, scratch: Scratch, out: torch.Tensor,
                  gain: bool) -> None:
    """Views ``s:e`` cut from ``windows`` (the strided (2B, H, W, C, Kh, Kw) windows of the padded float
    sources) and resized into ``out`` (m, C, size, size) by two products, along the width
    (``cols = crops @ wx``) then the height (``wy @ cols``); ``gain``: brightness and the uint8 scale
    applied to the crops first (resizing is linear), else left to the caller."""
    m, channels, size = e - s, out.shape[1], out.shape[-1]
    kh, kw = windows.shape[-2:]
    crops = windows[plan.source[s:e], plan.tops[s:e], plan.lefts[s:e]]  # (m, C, Kh, Kw), a copy
    if gain:
        crops.mul_(plan.gain[s:e].view(-1, 1, 1, 1))
    cols = scratch.get("cols", m * channels, kh, size)
    # When all crops have the same width the first product is one big GEMM with a shared matrix.
    if plan.wx_index is None:
        torch.mm(crops.view(-1, kw), plan.wx[0], out=cols.view(-1, size))
    else:
        torch.bmm(crops.view(m, channels * kh, kw), plan.wx.index_select(0, plan.wx_index[s:e]),
                  out=cols.view(m, channels * kh, size))
    if plan.wy_index is None:
        rows = plan.wy[0].expand(m * channels, size, kh)
    else:
        rows = plan.wy.index_select(0, plan.wy_index[s:e].repeat_interleave(channels))
    torch.bmm(rows, cols, out=out.view(-1, size, size))


def _mask(sorted_rows: torch.Tensor, s: int, e: int) -> np.ndarray:
    """(e - s,) booleans: which of the views s..e-1 are in a sorted index tensor (on the host)."""
    mask = np.zeros(e - s, bool)
    mask[sorted_rows[_rows_in(sorted_rows, s, e)].numpy() - s] = True
    return mask


def _fused_colour(views: torch.Tensor, x: torch.Tensor, plan: _Plan, spec: ViewSpec, s: int, e: int,
                  radius: int) -> None:
    """Views ``s:e`` of RGB ``views`` (resized, uint8 or float, brightness not applied) through the colour
    ops, grayscale, blur, solarize and normalisation into ``x``, on CPU, by the fused kernel of
    :mod:`onepoch.views.kernels`; views too small for its blur (no larger than the radius) are blurred
    and finished here, by the eager ops."""
    jitter = spec.jitter_p > 0
    blurred = _mask(plan.blur, s, e)
    solarized = _mask(plan.solarize, s, e)
    r = _rows_in(plan.blur, s, e)
    in_kernel = blurred.any() and spec.size > radius
    taps = None
    if in_kernel:
        taps = np.zeros((e - s, 2 * radius + 1), np.float32)
        taps[blurred] = gaussian_kernels(plan.blur_sigma[r], radius).numpy()
    kernels.render_colour(
        views, x, gain=plan.gain[s:e],
        contrast=plan.contrast[s:e] if jitter and spec.contrast > 0 else None,
        saturation=plan.saturation[s:e] if jitter and spec.saturation > 0 else None,
        hue=plan.hue[s:e] if jitter and spec.hue > 0 else None,
        grayscale=_mask(plan.grayscale, s, e), blur_taps=taps, finish=~blurred | in_kernel, solarize=solarized,
        threshold=spec.solarize_threshold, mean=spec.mean if spec.std is not None else None, std=spec.std)
    if in_kernel or not blurred.any():
        return
    rows = torch.from_numpy(np.flatnonzero(blurred))
    y = blur(x.index_select(0, rows), plan.blur_sigma[r], radius)
    apply_rows_(y, torch.from_numpy(np.flatnonzero(solarized[blurred])), solarize, spec.solarize_threshold)
    if spec.mean is not None and spec.std is not None:
        y.sub_(torch.tensor(spec.mean).view(1, -1, 1, 1)).mul_(1 / torch.tensor(spec.std).view(1, -1, 1, 1))
    x.index_copy_(0, rows, y)


def _rows_in(host_rows: torch.Tensor, start: int, end: int) -> slice:
    """The slice of a sorted index tensor that falls in [start, end) (bounds found on the host copy)."""
    lo, hi = np.searchsorted(host_rows.numpy(), (start, end))
    return slice(int(lo), int(hi))


def _default_chunk(device: torch.device, crop_bytes: int) -> int:
    """Views per chunk. On CPU, the chunk's float32 crops (``crop_bytes`` each) stay under 4 MiB, so
    that the ~30 elementwise passes of the colour ops run in cache (measured on 2000 views of 224x224:
    1.6 s at 4 MiB against 2.3 s at 32 MiB; of 96x96: 0.31 s against 0.42 s); a GPU takes them all at
    once, under 2 GiB, which matters for large photographs."""
    if device.type == "cuda":
        return max(1, min(1 << 30, (2 << 30) // crop_bytes))
    return max(1, min(384, (4 << 20) // crop_bytes))


def apply_view_params(images: torch.Tensor, params: ViewParams, spec: ViewSpec, *,
                      dtype: torch.dtype = torch.float32, channels_last: bool = False,
                      chunk: int | None = None, resized: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Render the views described by ``params`` from ``images`` (uint8 (B, H, W, C), or float in
    [0, 1]); returns ``(N, C, size, size)`` of ``dtype`` on the images' device. ``resized``: the views'
    crops already cut and resized (uint8 (N, C, size, size), e.g. by :func:`resize_view` in decoding
    threads, flips applied); then ``images`` only gives the channels and device, and the rest of the
    recipe (colour, blur, solarize, normalisation) is applied to them. ``out``: an
    ``(N, C, size, size)`` tensor of ``dtype`` on the images' device, each view contiguous (rows of a
    larger batch may be strided), to render into and return: a buffer kept across steps (on CPU a
    fresh output of ImageNet-sized views costs ~0.4 s of page faults per 2000 views of 224x224).

    Precision policy: views are computed in float32 with autocast off, whatever the caller's
    autocast state (bf16 matrix products would blur and resize in bf16); ``dtype`` only sets the
    stored result."""
    with torch.autocast(device_type=images.device.type, enabled=False):
        return _render(images, params, spec, dtype=dtype, channels_last=channels_last, chunk=chunk,
                       resized=resized, out=out)


def _render(images: torch.Tensor, params: ViewParams, spec: ViewSpec, *, dtype: torch.dtype,
            channels_last: bool, chunk: int | None, resized: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (B, H, W, C) with C in (1, 3), got {tuple(images.shape)}")
    device = images.device
    bsz, _, width, channels = images.shape
    if spec.mean is not None and len(spec.mean) not in (1, channels):
        raise ValueError(f"ViewSpec mean/std have {len(spec.mean)} values but the images have {channels} channels")
    size = spec.size
    host = params.to("cpu")
    scale = 1 / 255 if images.dtype == torch.uint8 else 1.0
    hs, ws = host.crop[:, 2].numpy(), host.crop[:, 3].numpy()
    per_view = resized is not None or (device.type == "cpu" and images.dtype == torch.uint8 and hs.size > 0
                                       and max(int(hs.max()), int(ws.max())) > PER_VIEW_RESIZE_ABOVE)
    host_plan = _make_plan(host, spec, bsz, width, scale, matrices=not per_view)
    plan = host_plan.to(device)
    n = host.crop.shape[0]
    # (resized one at a time, a view never holds more than its output in float)
    kh, kw = (size, size) if per_view else (plan.wy.shape[-1], plan.wx.shape[-2])
    radius = max(1, math.ceil(3 * spec.blur_sigma[1]))  # the same truncation for every view

    # Dense resampling reads Kh x Kw windows (the longest crop) through a strided view of the zero-padded
    # sources, the mirrored images stacked after the originals.
    if per_view:
        src = images.permute(0, 3, 1, 2)
    else:
        src = torch.cat([images, images.flip(2)]).permute(0, 3, 1, 2)
        src = torch.nn.functional.pad(src.to(torch.float32, memory_format=torch.contiguous_format),
                                      (0, kw - 1, 0, kh - 1))
        windows = src.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5)  # (2B, H, W, C, Kh, Kw)

    jitter = spec.jitter_p > 0
    contrast = jitter and spec.contrast > 0
    saturation = jitter and channels == 3 and spec.saturation > 0
    hue = jitter and channels == 3 and spec.hue > 0
    if spec.mean is not None and spec.std is not None:
        mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
        inv_std = 1 / torch.tensor(spec.std, device=device).view(1, -1, 1, 1)

    if out is None:
        out = torch.empty(n, channels, size, size, device=device, dtype=dtype)
    elif (tuple(out.shape) != (n, channels, size, size) or out.dtype != dtype or out.device != device
          or (n and not out[0].is_contiguous())):
        raise ValueError(f"out must be a {(n, channels, size, size)} {dtype} tensor on {device} with contiguous "
                         f"views, got {tuple(out.shape)} {out.dtype} on {out.device}")
    in_place = dtype == torch.float32 and (per_view or out.is_contiguous())  # the dense path needs a flat x
    scratch = thread_scratch(device)
    fused = device.type == "cpu" and channels == 3 and kernels.available()
    step = chunk or _default_chunk(device, channels * kh * kw * 4)
    if fused and resized is not None and chunk is None:
        step = max(1, n)  # the kernel works view by view in cache: one call for views already resized
    for s in range(0, n, step):
        e = min(n, s + step)
        m = e - s
        x = out[s:e] if in_place else scratch.get("x", m, channels, size, size)
        if fused:  # resize into a buffer, then one fused kernel from there into x
            if per_view:
                views = (resized[s:e] if resized is not None else
                         _resize_views(src, host, range(s, e), size, spec.interpolation))
            else:
                views = scratch.get("resized", m, channels, size, size)
                _resize_dense(windows, plan, s, e, scratch, views, gain=False)
            _fused_colour(views, x, plan, spec, s, e, radius)
            if not in_place:
                out[s:e].copy_(x)
            continue
        if per_view:
            x.copy_(resized[s:e] if resized is not None else
                    _resize_views(src, host, range(s, e), size, spec.interpolation))
            x.mul_(plan.gain[s:e].view(-1, 1, 1, 1))  # brightness and the uint8 scale
        else:
            _resize_dense(windows, plan, s, e, scratch, x, gain=True)
        x.clamp_(0, 1)  # interpolation overshoot and brightness > 1
        if contrast:
            adjust_contrast_(x, plan.contrast[s:e])
        if saturation:
            adjust_saturation_(x, plan.saturation[s:e], scratch)
        if hue and bool(host_plan.hue[s:e].any()):
            adjust_hue_(x, plan.hue[s:e], scratch)
        if channels == 3:
            r = _rows_in(host_plan.grayscale, s, e)
            apply_rows_(x, plan.grayscale[r] - s, grayscale)
        r = _rows_in(host_plan.blur, s, e)
        apply_rows_(x, plan.blur[r] - s, blur, plan.blur_sigma[r], radius)
        r = _rows_in(host_plan.solarize, s, e)
        apply_rows_(x, plan.solarize[r] - s, solarize, spec.solarize_threshold)
        if spec.mean is not None:
            x.sub_(mean).mul_(inv_std)
        if not in_place:
            out[s:e].copy_(x)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def make_views(images: torch.Tensor, spec: ViewSpec, generator: torch.Generator | None = None, *,
               dtype: torch.dtype = torch.float32, channels_last: bool = False,
               chunk: int | None = None) -> torch.Tensor:
    """``spec.count`` random views of each image of a uint8 batch ``(B, H, W, C)``, patch-major:
    returns ``(count*B, C, size, size)`` with row ``v*B + b`` = view ``v`` of image ``b``."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {tuple(images.shape)}")
    params = sample_view_params(spec, images.shape[0], images.shape[1], images.shape[2], generator)
    return apply_view_params(images, params, spec, dtype=dtype, channels_last=channels_last, chunk=chunk)
