"""View recipes: :class:`ViewSpec` (how many views, their size, each op's probability and strength), the
named presets, and :func:`load_view_spec` (a spec from a preset name, a YAML file, a dict, plus overrides)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from onepoch.config import dataclass_from_dict, suggest
from onepoch.errors import ConfigError


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
