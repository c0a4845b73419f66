"""Batched multi-view augmentation on CPU or CUDA tensors.

``make_views(images, spec, generator)`` turns a uint8 batch ``(B, H, W, C)`` into a float tensor of
``V*B`` views ``(V*B, C, h, w)``, **patch-major**: rows ``v*B .. v*B+B-1`` are view ``v`` of every
image. Every random parameter is drawn per view from one ``torch.Generator``; the ops then run as a
handful of batched tensor kernels (no per-sample Python loop, no PIL):

* random resized crop + horizontal flip + resize: the crop window is gathered from the image (or
  from its mirror image, for a flipped view) and resized by two matrix products,
  ``out_c = Wy @ crop_c @ Wx^T``, with interpolation matrices per crop size (bilinear or bicubic,
  Pillow-style antialiasing when shrinking);
* colour jitter (brightness, contrast, saturation, hue), grayscale, solarize, normalize: tensor
  arithmetic over the whole batch; gaussian blur: sums of shifted copies with per-view taps. On CPU,
  with numba installed, RGB views go through the fused kernels of :mod:`onepoch.colour_kernels`
  instead (one pass per view, the same results up to float rounding).

The semantics follow torchvision's ``RandomResizedCrop``/``ColorJitter``/``RandomGrayscale`` on
values in [0, 1] (clamped after each jitter op), with one documented difference: the four jitter
ops are applied in the fixed order brightness, contrast, saturation, hue rather than in a random
order per image (brightness, contrast and saturation commute exactly before clamping).

The random numbers come from one ``torch.rand`` call with the generator; everything else about
the parameters is derived on the host, so with a CPU generator the same seed gives the same views
on every device, and rendering on a GPU needs no device-to-host synchronisation.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from onepoch import colour_kernels
from onepoch.config import dataclass_from_dict, suggest
from onepoch.errors import ConfigError

__all__ = [
    "PRESETS",
    "ViewParams",
    "ViewSpec",
    "apply_view_params",
    "concat_view_params",
    "get_preset",
    "load_view_spec",
    "make_views",
    "sample_view_params",
    "seeded_generator",
]

# ITU-R 601-2 luma, as Pillow's convert("L") and ImageEnhance use.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 times before falling back to a centre crop


@dataclass(frozen=True)
class ViewSpec:
    """A view recipe: how many views of each image, their size, and each op's probability/strength.

    ``brightness``/``contrast``/``saturation`` = s draws a factor in [max(0, 1-s), 1+s];
    ``hue`` = h draws a shift in [-h, h] (fraction of the hue circle, h <= 0.5). ``mean``/``std``
    (per channel, 0..1 scale) normalise the output when given.
    """

    count: int = 2
    size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"ViewSpec.{name} = {getattr(self, name)!r}: {why}")

        if self.count < 1:
            raise bad("count", "must be >= 1")
        if self.size < 1:
            raise bad("size", "must be >= 1")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise bad("crop_scale", "needs 0 < min <= max <= 1")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise bad("crop_ratio", "needs 0 < min <= max")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise bad("interpolation", "must be 'bilinear' or 'bicubic'")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, "is a probability and must lie in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not 0 <= self.hue <= 0.5:
            raise bad("hue", "must lie in [0, 0.5]")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise bad("blur_sigma", "needs 0 < min <= max")
        if not 0 <= self.solarize_threshold <= 1:
            raise bad("solarize_threshold", "must lie in [0, 1]")
        if (self.mean is None) != (self.std is None):
            raise bad("mean", "mean and std must be given together")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
                raise bad("mean", "mean and std need 1 or 3 values each")
            if min(self.std) <= 0:
                raise bad("std", "must be > 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


PRESETS: dict[str, ViewSpec] = {
    # EMP-SSL's CIFAR patches (Tong et al. 2023, and their code): a fixed 0.25-area square crop
    # resized to 32x32, flip .5, colour jitter .4/.4/.4/.2 with p .8, grayscale .2, blur .1, solarize .1.
    "emp_ssl_cifar": ViewSpec(
        count=20, size=32, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), flip_p=0.5,
        jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2,
        grayscale_p=0.2, blur_p=0.1, blur_sigma=(0.1, 2.0), solarize_p=0.1,
    ),
    # EMP-SSL's ImageNet patches (its code's dataset/aug4img.py): RandomResizedCrop(224, scale 0.25,
    # ratio 3/4..4/3, bicubic) and the same colour recipe; set `size` smaller for CPU-sized runs.
    "emp_ssl_imagenet": ViewSpec(
        count=20, size=224, crop_scale=(0.25, 0.25), crop_ratio=(3 / 4, 4 / 3), interpolation="bicubic",
        flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2,
        grayscale_p=0.2, blur_p=0.1, blur_sigma=(0.1, 2.0), solarize_p=0.1,
    ),
    # The same recipe sized for 28x28 grayscale Fashion-MNIST: 0.25-area (14x14) crops -> 16x16.
    # Saturation, hue and grayscale do nothing on one channel, so they are off.
    "emp_ssl_fashion_mnist": ViewSpec(
        count=16, size=16, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), flip_p=0.5,
        jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0,
        grayscale_p=0.0, blur_p=0.1, blur_sigma=(0.1, 1.0), solarize_p=0.1,
    ),
    # Two views as in SimCLR's CIFAR recipe (Chen et al. 2020, appendix B.9), also used by the
    # VICReg and Barlow Twins baselines here: random-resized crop (0.08-1 area, 3/4-4/3), flip,
    # colour jitter .4/.4/.4/.1 with p .8, grayscale .2, no blur (32x32 images).
    "simclr_cifar": ViewSpec(
        count=2, size=32, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5,
        jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.2,
    ),
    # The same for 28x28 grayscale Fashion-MNIST: crops of 0.2-1 area back to 28x28, flip,
    # brightness/contrast .4 with p .8.
    "simclr_fashion_mnist": ViewSpec(
        count=2, size=28, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5,
        jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0, grayscale_p=0.0,
    ),
}


def get_preset(name: str) -> ViewSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown view preset {name!r}{suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}"
        ) from None


def load_view_spec(spec: str | Path | dict | ViewSpec | None, overrides: dict[str, Any] | None = None
                   ) -> ViewSpec:
    """A ViewSpec from a preset name, a YAML file of ViewSpec keys, a dict, or a ViewSpec; then
    ``overrides`` (key -> value) on top. Unknown keys are ConfigErrors naming the key."""
    import yaml

    if isinstance(spec, ViewSpec):
        base = spec
    elif spec is None:
        base = ViewSpec()
    elif isinstance(spec, dict):
        base = dataclass_from_dict(ViewSpec, spec, where="ViewSpec")
    elif str(spec) in PRESETS:
        base = PRESETS[str(spec)]
    elif Path(spec).suffix in (".yaml", ".yml", ".json") or Path(spec).exists():
        path = Path(spec)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"cannot read view spec {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        data = data.get("views", data) if isinstance(data, dict) else data
        base = dataclass_from_dict(ViewSpec, data, where="ViewSpec")
    else:
        base = get_preset(str(spec))
    if overrides:
        base = dataclass_from_dict(ViewSpec, overrides, where="ViewSpec", base=base)
    return base


# --------------------------------------------------------------------------------------------------
# Random parameters
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Resampling matrices
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


def _axis_matrices(lengths: np.ndarray, out_size: int, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resampling matrices for crops of ``lengths``: a table ``(U, out_size, K)`` with one matrix
    per distinct length (K = the longest crop) and each view's row in it; the index is None when
    every crop has the same length (one shared matrix)."""
    distinct, inverse = np.unique(lengths, return_inverse=True)
    table = resample_matrices(torch.from_numpy(distinct), out_size, int(distinct.max()), kind)
    return table, (None if distinct.size == 1 else torch.from_numpy(inverse.reshape(-1).astype(np.int64)))


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """``(n, 2 radius + 1)`` normalised 1-D gaussian kernels ``exp(-t^2 / 2 sigma^2)``, ``|t| <= radius``."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return kernel / kernel.sum(1, keepdim=True)


def _gaussian_blur_matrices(sigma: torch.Tensor, size: int, radius: int) -> torch.Tensor:
    """``(n, size, size)`` matrices of a 1-D gaussian blur with per-view ``sigma`` (kernels of
    :func:`_gaussian_kernels`), reflect padding at the borders, repeated when the radius exceeds the
    side (for views too small for :func:`_blur`'s padded shifted sums)."""
    dev = sigma.device
    kernel = _gaussian_kernels(sigma, radius)
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


# --------------------------------------------------------------------------------------------------
# Colour ops, in place on (n, C, h, w) float tensors in [0, 1]
# --------------------------------------------------------------------------------------------------


class _Scratch:
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


def _thread_scratch(device: torch.device) -> _Scratch:
    """The calling thread's scratch buffers on CPU, kept across calls (decode pool threads render one
    image's views per call, and fresh buffers of several MiB are page-faulted in again each time); fresh
    ones on other devices, whose caching allocators reuse memory."""
    if device.type != "cpu":
        return _Scratch(device)
    scratch = getattr(_SCRATCH, "cpu", None)
    if scratch is None:
        scratch = _SCRATCH.cpu = _Scratch(device)
    return scratch


def _gray(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Luma of RGB (n, 3, h, w) into ``out`` (n, 1, h, w)."""
    r, g, b = GRAY_WEIGHTS
    return torch.mul(x[:, 0:1], r, out=out).add_(x[:, 1:2], alpha=g).add_(x[:, 2:3], alpha=b)


def _adjust_contrast_(x: torch.Tensor, factor: torch.Tensor) -> None:
    """x <- clamp(f*x + (1-f)*mean(gray(x)))  (mean over the whole view)."""
    means = x.mean((2, 3))  # (n, C)
    if x.shape[1] == 3:
        means = means @ torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    else:
        means = means[:, 0]
    x.mul_(factor.view(-1, 1, 1, 1)).add_(((1 - factor) * means).view(-1, 1, 1, 1)).clamp_(0, 1)


def _adjust_saturation_(x: torch.Tensor, factor: torch.Tensor, scratch: _Scratch) -> None:
    """x <- clamp(f*x + (1-f)*gray(x))."""
    n, _, h, w = x.shape
    gray = _gray(x, scratch.get("gray", n, 1, h, w)).mul_((1 - factor).view(-1, 1, 1, 1))
    x.mul_(factor.view(-1, 1, 1, 1)).add_(gray).clamp_(0, 1)


# HSV -> RGB, written with q = 6*H + offset_k - 3: channel k = min + chroma * clamp(|3 - |q_k|| - 1, 0, 1)
# for q_k in [-4, 6) (|3 - |q_k|| is the distance from q_k + 3 to the nearest multiple of 6).
_HUE_OFFSETS = (0.0, -2.0, -4.0)


def _adjust_hue_(x: torch.Tensor, shift: torch.Tensor, scratch: _Scratch) -> None:
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


def _apply_rows_(x: torch.Tensor, rows: torch.Tensor, fn, *args) -> None:
    """x[rows] <- fn(x[rows], *args) for a (possibly empty) index of rows."""
    if rows.numel():
        x.index_copy_(0, rows, fn(x.index_select(0, rows), *args))


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    return _gray(x, torch.empty(n, 1, h, w, device=x.device, dtype=x.dtype)).expand_as(x)


def _solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    if threshold == 0.5:
        return torch.minimum(x, 1 - x)  # invert values >= 0.5
    return torch.where(x >= threshold, 1 - x, x)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
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
    taps = _gaussian_kernels(sigma, radius).view(n, 1, 1, 1, -1)
    padded = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    rows = torch.mul(padded[..., 0:w], taps[..., 0])  # along width: (n, C, h + 2r, w)
    for j in range(1, 2 * radius + 1):
        rows.addcmul_(padded[..., j:j + w], taps[..., j])
    out = torch.mul(rows[:, :, 0:h], taps[..., 0])  # along height
    for j in range(1, 2 * radius + 1):
        out.addcmul_(rows[:, :, j:j + h], taps[..., j])
    return out


# --------------------------------------------------------------------------------------------------
# Applying views: plan on the host, then run batched kernels on the images' device
# --------------------------------------------------------------------------------------------------


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
        wy, wy_index = _axis_matrices(hs, spec.size, spec.interpolation)
        wx, wx_index = _axis_matrices(ws, spec.size, spec.interpolation)
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


def _resize_views(src: torch.Tensor, host: ViewParams, rows: range, size: int, mode: str) -> torch.Tensor:
    """The views ``rows`` cropped from uint8 ``src`` (B, C, H, W) and resized to ``size`` one at a time with
    antialiasing (a uint8 result, as Pillow's resize gives: within 1-3 levels of it on photographs), the
    flipped ones mirrored after resizing (the same as resizing the mirrored crop); returns (m, C, size, size)
    uint8."""
    crop, image, flip = host.crop.numpy(), host.image_index.numpy(), host.flip.numpy()
    with one_torch_thread():  # each call is a fraction of a millisecond: threads would only synchronise
        return torch.cat([resize_view(src[image[j]:image[j] + 1], crop[j], bool(flip[j]), size, mode)
                          for j in rows])


def _resize_dense(windows: torch.Tensor, plan: _Plan, s: int, e: int, scratch: _Scratch, out: torch.Tensor,
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
    :mod:`onepoch.colour_kernels`; views too small for its blur (no larger than the radius) are blurred
    and finished here, by the eager ops."""
    jitter = spec.jitter_p > 0
    blurred = _mask(plan.blur, s, e)
    solarized = _mask(plan.solarize, s, e)
    r = _rows_in(plan.blur, s, e)
    in_kernel = blurred.any() and spec.size > radius
    taps = None
    if in_kernel:
        taps = np.zeros((e - s, 2 * radius + 1), np.float32)
        taps[blurred] = _gaussian_kernels(plan.blur_sigma[r], radius).numpy()
    colour_kernels.render_colour(
        views, x, gain=plan.gain[s:e],
        contrast=plan.contrast[s:e] if jitter and spec.contrast > 0 else None,
        saturation=plan.saturation[s:e] if jitter and spec.saturation > 0 else None,
        hue=plan.hue[s:e] if jitter and spec.hue > 0 else None,
        grayscale=_mask(plan.grayscale, s, e), blur_taps=taps, finish=~blurred | in_kernel, solarize=solarized,
        threshold=spec.solarize_threshold, mean=spec.mean if spec.std is not None else None, std=spec.std)
    if in_kernel or not blurred.any():
        return
    rows = torch.from_numpy(np.flatnonzero(blurred))
    y = _blur(x.index_select(0, rows), plan.blur_sigma[r], radius)
    _apply_rows_(y, torch.from_numpy(np.flatnonzero(solarized[blurred])), _solarize, spec.solarize_threshold)
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
    scratch = _thread_scratch(device)
    fused = device.type == "cpu" and channels == 3 and colour_kernels.available()
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
            _adjust_contrast_(x, plan.contrast[s:e])
        if saturation:
            _adjust_saturation_(x, plan.saturation[s:e], scratch)
        if hue and bool(host_plan.hue[s:e].any()):
            _adjust_hue_(x, plan.hue[s:e], scratch)
        if channels == 3:
            r = _rows_in(host_plan.grayscale, s, e)
            _apply_rows_(x, plan.grayscale[r] - s, _grayscale)
        r = _rows_in(host_plan.blur, s, e)
        _apply_rows_(x, plan.blur[r] - s, _blur, plan.blur_sigma[r], radius)
        r = _rows_in(host_plan.solarize, s, e)
        _apply_rows_(x, plan.solarize[r] - s, _solarize, spec.solarize_threshold)
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
