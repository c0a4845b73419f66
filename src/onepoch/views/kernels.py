"""Fused CPU kernels for the per-pixel half of a view recipe (optional: needs numba).

On CPU, :func:`onepoch.views.render.apply_view_params` runs the colour ops of a view (brightness, contrast,
saturation, hue, grayscale, then solarize and normalisation) as ~45 eager torch passes over
memory. When numba is installed (``pip install "onepoch[fast]"``), :func:`render_colour` does
all of them in one pass per view (plus one read-only pass for the contrast mean), compiled for the
machine's vector unit, with the same arithmetic:

* brightness: ``x <- clamp(b * x)`` (``b`` also carries the 1/255 of uint8 input);
* contrast: ``x <- clamp(c * x + (1 - c) * mean(gray(x)))``, the mean over the whole view (float64 sum);
* saturation: ``x <- clamp(s * x + (1 - s) * gray(x))``;
* hue: the HSV hue rotated by ``h`` of a turn, V and S kept (``rgb -> hsv -> rgb``), as
  ``channel_k = min + chroma * clamp(||6H' - 2k| - 3| - 1, 0, 1)`` with ``H' = (H + h) mod 1``;
* grayscale: ``r = g = b = gray(x)``, ``gray = 0.299 R + 0.587 G + 0.114 B``;
* gaussian blur: separable, per-view taps, reflected at the borders (torchvision's ``gaussian_blur``);
* solarize ``x <- 1 - x where x >= t``, then ``x <- (x - mean_c) / std_c``.

The results equal the eager torch ops up to float rounding (~1e-6; tested, and the reference tests
against torchvision run through them). They are deterministic and do not depend on the calling
thread; the kernels release Python's lock, so a decode pool's threads run them in parallel.

``ONEPOCH_CPU_KERNELS`` chooses: ``auto`` (the default: the kernels when numba imports), ``numba``
(required: an error without it) or ``torch`` (the eager ops). The first call in a process loads the
compiled kernels from numba's on-disk cache (~0.5 s; compiling them the first time takes ~10 s). The
kernels themselves are in :mod:`onepoch.views._numba`, imported only when numba is installed.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import torch

from onepoch.errors import ConfigError

__all__ = ["available", "render_colour"]

_lock = threading.Lock()
_kernel: Any = None
_tried = False


CHOICES = ("auto", "numba", "torch")


def available() -> bool:
    """Whether the fused kernels are in use, by ``ONEPOCH_CPU_KERNELS`` (see the module docstring)."""
    choice = os.environ.get("ONEPOCH_CPU_KERNELS", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"ONEPOCH_CPU_KERNELS={choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "torch":
        return False
    loaded = _compiled() is not None
    if not loaded and choice == "numba":
        raise ConfigError('ONEPOCH_CPU_KERNELS=numba but numba is not installed: pip install "onepoch[fast]"')
    return loaded


def _compiled() -> Any:
    """The kernels' module, :mod:`onepoch.views._numba`, or None without numba (imported once)."""
    global _kernel, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    from onepoch.views import _numba as _kernel
                except ImportError:
                    _kernel = None
                _tried = True
    return _kernel


def render_colour(src: torch.Tensor, out: torch.Tensor, *, gain: torch.Tensor, contrast: torch.Tensor | None,
                  saturation: torch.Tensor | None, hue: torch.Tensor | None, grayscale: np.ndarray,
                  blur_taps: np.ndarray | None, finish: np.ndarray, solarize: np.ndarray, threshold: float,
                  mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
    """Write the colour ops of ``m`` square RGB views ``src`` (``(m, 3, s, s)``, uint8 or float32 on CPU; copied
    first unless each view is contiguous) into ``out`` (``(m, 3, s, s)`` float32, each view contiguous, not
    overlapping ``src``). Per view: ``gain``, ``contrast``, ``saturation``, ``hue`` (float32 ``(m,)``; None: that op
    is off), boolean ``grayscale``, ``blur_taps`` (``(m, 2r + 1)`` float32 gaussian taps, a row of zeros
    for a view not blurred; None: none is; ``r`` under the views' side), and ``finish``
    (solarize when ``solarize``, then normalise by ``mean``/``std`` when given; the views not finished
    are left for the caller to finish)."""
    kernel = _compiled()
    m, channels = src.shape[0], src.shape[1]
    if channels != 3 or out.shape != src.shape or out.dtype != torch.float32 or src.shape[-1] != src.shape[-2]:
        raise ValueError(f"render_colour needs (m, 3, s, s) views and a float32 out of the same shape, got "
                         f"{tuple(src.shape)} -> {tuple(out.shape)} {out.dtype}")
    if blur_taps is None:
        blur_taps = np.zeros((m, 1), np.float32)
    elif blur_taps.shape[0] != m or blur_taps.shape[1] // 2 >= src.shape[-1]:
        raise ValueError(f"blur_taps must be (m, 2r + 1) with r under the views' side, got "
                         f"{blur_taps.shape} for views {tuple(src.shape)}")
    mode = (grayscale.astype(np.uint8) * kernel.GRAYSCALE | finish.astype(np.uint8) * kernel.FINISH
            | solarize.astype(np.uint8) * kernel.SOLARIZE | blur_taps.any(1).astype(np.uint8) * kernel.BLUR)
    ones = np.ones(m, np.float32)

    def arr(t: torch.Tensor | None) -> np.ndarray:
        return ones if t is None else np.ascontiguousarray(t.numpy(), dtype=np.float32)

    norm = mean is not None and std is not None
    means = np.broadcast_to(np.asarray(mean if norm else 0.0, np.float32), 3).copy()
    inv_std = (1 / np.broadcast_to(np.asarray(std if norm else 1.0, np.float32), 3)).astype(np.float32)
    src_flat, src_at = _flat_views(src if m == 0 or src[0].is_contiguous() else src.contiguous())
    out_flat, out_at = _flat_views(out)
    kernel.render(src_flat, src_at, out_flat, out_at, src.shape[-1], arr(gain), arr(contrast), arr(saturation),
           arr(hue) if hue is not None else np.zeros(m, np.float32), mode,
           np.ascontiguousarray(blur_taps, dtype=np.float32), np.float32(threshold),
           contrast is not None, saturation is not None, hue is not None, means, inv_std)


def _flat_views(views: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(a 1-D array over the memory of ``views``, where each view starts in it): ``views`` (m, C, h, w), each
    view contiguous, may be rows of a larger batch (a stride of more than one view between them)."""
    m = views.shape[0]
    per = views[0].numel() if m else 0
    step = views.stride(0) if m > 1 else per
    if m and (not views[0].is_contiguous() or step < per):
        raise ValueError(f"each view must be contiguous and apart from the others, got strides {views.stride()}")
    flat = torch.as_strided(views, ((m - 1) * step + per if m else 0,), (1,))
    return flat.numpy(), np.arange(m, dtype=np.int64) * step
