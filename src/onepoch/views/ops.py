"""The image operations of views, batched over many views at once: the resampling matrices of crop + resize
(bilinear, or Pillow's bicubic, antialiased when shrinking) and one view's uint8 crop + resize
(:func:`resize_view`); the colour ops in place on ``(n, C, h, w)`` float views in [0, 1] (contrast,
saturation, hue, grayscale, solarize) and the gaussian blur; the per-thread scratch buffers they write into.

Semantics of torchvision's ``ColorJitter``/``RandomGrayscale``/``GaussianBlur`` on values in [0, 1], each
jitter op clamped after it."""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

# ITU-R 601-2 luma, as Pillow's convert("L") and ImageEnhance use.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------------
# Resampling matrices, and one view's crop + resize
# --------------------------------------------------------------------------------------------------


def _filter(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Interpolation kernels: triangle (bilinear) or Keys cubic with a = -0.5 (Pillow's bicubic)."""
    t = t.abs()
    if kind == "bilinear":
        return (1 - t).clamp_(min=0)
    a = -0.5
    t2, t3 = t * t, t * t * t
    near = (a + 2) * t3 - (a + 3) * t2 + 1
    far = a * t3 - 5 * a * t2 + 8 * a * t - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def resample_matrices(lengths: torch.Tensor, out_size: int, window: int, kind: str) -> torch.Tensor:
    """Rows of the 1-D resampling from a crop of ``length`` source pixels to ``out_size`` pixels,
    Pillow-style: output pixel ``o`` is centred at ``(o + .5) * length / out_size`` in the crop,
    the kernel is widened by the scale when shrinking (antialias), pixels outside the crop get no
    weight, and each row sums to 1. Returns ``(len(lengths), out_size, window)``; columns past a
    crop's length are 0."""
    dev = lengths.device
    length = lengths.to(torch.float64).view(-1, 1, 1)
    scale = length / out_size
    centre = (torch.arange(out_size, device=dev, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale
    src = torch.arange(window, device=dev, dtype=torch.float64).view(1, 1, -1) + 0.5
    w = _filter((src - centre) / scale.clamp(min=1.0), kind)
    w = w * (src < length)
    w = w / w.sum(-1, keepdim=True)
    return w.to(torch.float32)


def axis_matrices(lengths: np.ndarray, out_size: int, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resampling matrices for crops of ``lengths``: a table ``(U, out_size, K)`` with one matrix
    per distinct length (K = the longest crop) and each view's row in it; the index is None when
    every crop has the same length (one shared matrix)."""
    distinct, inverse = np.unique(lengths, return_inverse=True)
    table = resample_matrices(torch.from_numpy(distinct), out_size, int(distinct.max()), kind)
    return table, (None if distinct.size == 1 else torch.from_numpy(inverse.reshape(-1).astype(np.int64)))


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """``(n, 2 radius + 1)`` normalised 1-D gaussian kernels ``exp(-t^2 / 2 sigma^2)``, ``|t| <= radius``."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return kernel / kernel.sum(1, keepdim=True)


def _gaussian_blur_matrices(sigma: torch.Tensor, size: int, radius: int) -> torch.Tensor:
    """``(n, size, size)`` matrices of a 1-D gaussian blur with per-view ``sigma`` (kernels of
    :func:`gaussian_kernels`), reflect padding at the borders, repeated when the radius exceeds the
    side (for views too small for :func:`blur`'s padded shifted sums)."""
    dev = sigma.device
    kernel = gaussian_kernels(sigma, radius)
    t = torch.arange(-radius, radius + 1, device=dev)
    pos = torch.arange(size, device=dev).view(-1, 1) + t.view(1, -1)  # (size, 2r+1)
    if size > 1:
        period = 2 * (size - 1)
        pos = pos.remainder(period)
        pos = torch.where(pos < size, pos, period - pos)
    else:
        pos = torch.zeros_like(pos)
    n = sigma.shape[0]
    m = torch.zeros(n, size, size, device=dev, dtype=torch.float32)
    m.scatter_add_(2, pos.unsqueeze(0).expand(n, -1, -1), kernel.unsqueeze(1).expand(-1, size, -1))
    return m


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's CPU ops of the calling thread on that thread alone, then restore its thread count.
    For small ops, and for any torch op in a worker thread (a decode pool's): OpenMP gives every
    calling thread its own team of workers, and idle teams left behind by pool threads were measured
    to slow the training thread's own parallel ops 2-2.5x on 2 cores (2000 views' colour ops: 2.2 s
    when the pool's resizes ran on one thread each, 4.9-6.2 s when they ran on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resize_view(image: torch.Tensor, crop: Any, flip: bool, size: int, mode: str) -> torch.Tensor:
    """One view's crop ``(top, left, height, width)`` of a uint8 image (1, C, H, W), resized to
    ``size x size`` with antialiasing (uint8, as Pillow's resize gives: within 1-3 levels of it on
    photographs) and mirrored after resizing when ``flip`` (the same as resizing the mirrored crop)."""
    t, left, h, w = (int(v) for v in crop)
    # A crop copied into its own channels-last block resizes faster than the strided crop, with the same bytes
    # out (bicubic, 20 crops of ~200 px on one thread: 2.1 against 4.4-8.8 ms to 96x96, 3.6 against 9.1-11.7 ms
    # to 224x224; the whole 96x96 JPEG pipeline on one thread: 106-112 against 98-100 images/s).
    cut = image[:, :, t:t + h, left:left + w].contiguous(memory_format=torch.channels_last)
    view = torch.nn.functional.interpolate(cut, size=(size, size), mode=mode, antialias=True)
    return view.flip(-1) if flip else view


# --------------------------------------------------------------------------------------------------
# Colour ops and blur, in place on (n, C, h, w) float tensors in [0, 1]
# --------------------------------------------------------------------------------------------------


class Scratch:
    """Reusable scratch buffers for the per-chunk loop. Large fresh CPU allocations page-fault on
    first touch and cost more than the arithmetic, so every op below writes into these."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, device=self.device, dtype=torch.float32)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


_SCRATCH = threading.local()


def thread_scratch(device: torch.device) -> Scratch:
    """The calling thread's scratch buffers on CPU, kept across calls (decode pool threads render one
    image's views per call, and fresh buffers of several MiB are page-faulted in again each time); fresh
    ones on other devices, whose caching allocators reuse memory."""
    if device.type != "cpu":
        return Scratch(device)
    scratch = getattr(_SCRATCH, "cpu", None)
    if scratch is None:
        scratch = _SCRATCH.cpu = Scratch(device)
    return scratch


def _gray(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Luma of RGB (n, 3, h, w) into ``out`` (n, 1, h, w)."""
    r, g, b = GRAY_WEIGHTS
    return torch.mul(x[:, 0:1], r, out=out).add_(x[:, 1:2], alpha=g).add_(x[:, 2:3], alpha=b)


def adjust_contrast_(x: torch.Tensor, factor: torch.Tensor) -> None:
    """x <- clamp(f*x + (1-f)*mean(gray(x)))  (mean over the whole view)."""
    means = x.mean((2, 3))  # (n, C)
    if x.shape[1] == 3:
        means = means @ torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    else:
        means = means[:, 0]
    x.mul_(factor.view(-1, 1, 1, 1)).add_(((1 - factor) * means).view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_saturation_(x: torch.Tensor, factor: torch.Tensor, scratch: Scratch) -> None:
    """x <- clamp(f*x + (1-f)*gray(x))."""
    n, _, h, w = x.shape
    gray = _gray(x, scratch.get("gray", n, 1, h, w)).mul_((1 - factor).view(-1, 1, 1, 1))
    x.mul_(factor.view(-1, 1, 1, 1)).add_(gray).clamp_(0, 1)


# HSV -> RGB, written with q = 6*H + offset_k - 3: channel k = min + chroma * clamp(|3 - |q_k|| - 1, 0, 1)
# for q_k in [-4, 6) (|3 - |q_k|| is the distance from q_k + 3 to the nearest multiple of 6).
_HUE_OFFSETS = (0.0, -2.0, -4.0)


def adjust_hue_(x: torch.Tensor, shift: torch.Tensor, scratch: Scratch) -> None:
    """Rotate the HSV hue of each RGB view by ``shift`` (a fraction of the circle), keeping HSV's
    V and S: the same result as rgb -> hsv, H <- (H + shift) mod 1, hsv -> rgb."""
    n, _, h, w = x.shape
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    vmax, vmin, chroma, is_r, is_g, hue6, t1, t2 = (
        scratch.get(k, n, h, w) for k in ("vmax", "vmin", "chroma", "is_r", "is_g", "hue6", "t1", "t2"))
    torch.maximum(torch.maximum(r, g, out=vmax), b, out=vmax)
    torch.minimum(torch.minimum(r, g, out=vmin), b, out=vmin)
    torch.sub(vmax, vmin, out=chroma)
    torch.eq(r, vmax, out=is_r)  # red is the max
    torch.eq(g, vmax, out=is_g).addcmul_(is_g, is_r, value=-1)  # green is, and red is not
    # 6*H*chroma per sector: red (g-b) | green (b-r) + 2C | blue (r-g) + 4C, the blue one as base.
    torch.sub(r, g, out=hue6).add_(chroma, alpha=4)
    torch.sub(g, b, out=t1).sub_(hue6)
    torch.sub(b, r, out=t2).add_(chroma, alpha=2).sub_(hue6)
    hue6.addcmul_(is_r, t1).addcmul_(is_g, t2)
    hue6.div_(torch.clamp(chroma, min=1e-12, out=t1)).add_((6 * shift).view(-1, 1, 1))
    hue6.sub_(torch.mul(hue6, 1 / 6, out=t1).floor_(), alpha=6)  # into [0, 6)
    q = torch.add(hue6.unsqueeze(1), torch.tensor(_HUE_OFFSETS, device=x.device).view(1, 3, 1, 1),
                  out=scratch.get("q", n, 3, h, w))
    q.abs_().sub_(3).abs_().sub_(1).clamp_(0, 1)
    torch.addcmul(vmin.unsqueeze(1), chroma.unsqueeze(1), q, out=x)


def apply_rows_(x: torch.Tensor, rows: torch.Tensor, fn, *args) -> None:
    """x[rows] <- fn(x[rows], *args) for a (possibly empty) index of rows."""
    if rows.numel():
        x.index_copy_(0, rows, fn(x.index_select(0, rows), *args))


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """The views turned gray: their luma in every channel."""
    n, _, h, w = x.shape
    return _gray(x, torch.empty(n, 1, h, w, device=x.device, dtype=x.dtype)).expand_as(x)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The views with every value ``v >= threshold`` inverted to ``1 - v``."""
    if threshold == 0.5:
        return torch.minimum(x, 1 - x)  # invert values >= 0.5
    return torch.where(x >= threshold, 1 - x, x)


def blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable gaussian blur of square (n, C, h, w) views, per-view ``sigma``, kernels truncated at
    ``radius``, reflect padding (torchvision's ``gaussian_blur``): along each axis, a sum of the
    2 radius + 1 shifted copies of the padded views weighted by their taps (measured faster on CPU
    than dense matrices, 4x, and than a depthwise convolution, 1.5x). Views no larger than the
    radius, which one reflection cannot pad, use the dense matrices of :func:`_gaussian_blur_matrices`."""
    n, c, h, w = x.shape
    if h <= radius:
        matrices = _gaussian_blur_matrices(sigma, h, radius)
        y = torch.bmm(x.reshape(n, c * h, w), matrices.transpose(1, 2))  # along width
        if c > 1:
            matrices = matrices.repeat_interleave(c, 0)
        return torch.bmm(matrices, y.view(n * c, h, w)).view(n, c, h, w)  # along height
    taps = gaussian_kernels(sigma, radius).view(n, 1, 1, 1, -1)
    padded = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    rows = torch.mul(padded[..., 0:w], taps[..., 0])  # along width: (n, C, h + 2r, w)
    for j in range(1, 2 * radius + 1):
        rows.addcmul_(padded[..., j:j + w], taps[..., j])
    out = torch.mul(rows[:, :, 0:h], taps[..., 0])  # along height
    for j in range(1, 2 * radius + 1):
        out.addcmul_(rows[:, :, j:j + h], taps[..., j])
    return out
