"""Write ``tests/reference/views.npz``: statistics of torchvision.transforms.v2's random view ops over
many draws, and torchvision's outputs of the deterministic ops on fixed images, the independent
reference that ``tests/test_reference_views.py`` compares ``onepoch.views`` with.

Run it in the reference environment (torch 2.14.1, torchvision 0.29.1; torchvision does not import
beside the project's CPU torch), from the repository root:

    /work/refvenv/bin/python tests/reference/make_view_reference.py

Statistics (N draws each, from torchvision's own parameter sampling ``make_params`` or, for the
probabilities, from applying the transform and seeing whether the image changed): for each
quantity x, the thresholds t_k (torchvision's sample quantiles) and the empirical CDF
F_ref(t_k) = fraction of draws with x <= t_k, or for an event its rate. This script does not import
onepoch: the fixture holds torchvision's numbers only. Keys are ``<case>.<name>``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

OUT = Path(__file__).with_name("views.npz")
N = 20000                      # draws per statistic
QUANTILES = np.array([0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98])

# RandomResizedCrop settings: (name, image height, width, scale, ratio). The last two exercise the
# fixed-size crop of EMP-SSL and the centre-crop fallback (a ratio the image cannot hold).
CROPS = [
    ("crop_simclr", 32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
    ("crop_fashion", 28, 28, (0.2, 1.0), (3 / 4, 4 / 3)),
    ("crop_wide_image", 24, 40, (0.08, 1.0), (3 / 4, 4 / 3)),
    ("crop_fixed", 32, 32, (0.25, 0.25), (1.0, 1.0)),
    ("crop_fallback", 32, 32, (0.9, 1.0), (2.0, 3.0)),
]
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
BLUR_SIGMA = (0.1, 2.0)
RATES = {"flip": 0.5, "jitter": 0.8, "grayscale": 0.2, "blur": 0.3, "solarize": 0.2}


def cdf(name: str, x: np.ndarray, fixture: dict) -> None:
    thresholds = np.unique(np.quantile(x, QUANTILES))
    fixture[f"{name}.thresholds"] = thresholds
    fixture[f"{name}.cdf"] = (x[:, None] <= thresholds[None, :]).mean(0)
    fixture[f"{name}.n"] = np.int64(x.shape[0])


def crop_statistics(fixture: dict) -> None:
    for name, height, width, scale, ratio in CROPS:
        t = v2.RandomResizedCrop(size=8, scale=scale, ratio=ratio)
        image = torch.zeros(1, height, width)
        boxes = np.array([[p["top"], p["left"], p["height"], p["width"]]
                          for p in (t.make_params([image]) for _ in range(N))], dtype=np.float64)
        top, left, h, w = boxes.T
        fixture[f"{name}.setting"] = np.array([height, width, *scale, *ratio], dtype=np.float64)
        cdf(f"{name}.area", h * w / (height * width), fixture)
        cdf(f"{name}.log_ratio", np.log(w / h), fixture)
        cdf(f"{name}.height", h, fixture)
        cdf(f"{name}.width", w, fixture)
        cdf(f"{name}.centre_y", (top + h / 2) / height, fixture)
        cdf(f"{name}.centre_x", (left + w / 2) / width, fixture)


def factor_statistics(fixture: dict) -> None:
    b, c, s, h = JITTER
    jitter = v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)
    image = torch.zeros(3, 2, 2)
    params = [jitter.make_params([image]) for _ in range(N)]
    for key in ("brightness", "contrast", "saturation", "hue"):
        cdf(f"jitter.{key}", np.array([p[f"{key}_factor"] for p in params]), fixture)
    blur = v2.GaussianBlur(kernel_size=13, sigma=BLUR_SIGMA)
    cdf("blur.sigma", np.array([blur.make_params([image])["sigma"][0] for _ in range(N)]), fixture)


def rate(transform, image: torch.Tensor) -> float:
    """The fraction of N applications that change ``image``."""
    return float(np.mean([not torch.equal(transform(image), image) for _ in range(N)]))


def rate_statistics(fixture: dict) -> None:
    ramp = torch.tensor([[[0.0, 1.0]]])                        # 1x1x2: a flip swaps the values
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)          # grayscale makes it gray
    mid = torch.full((1, 1, 1), 0.5)                           # brightness changes it (a.s.)
    impulse = torch.zeros(1, 5, 5)
    impulse[0, 2, 2] = 1.0                                     # a blur spreads it
    bright = torch.full((1, 1, 1), 0.9)                        # solarize at .5 inverts it
    transforms = {
        "flip": (v2.RandomHorizontalFlip(p=RATES["flip"]), ramp),
        "jitter": (v2.RandomApply([v2.ColorJitter(brightness=0.4)], p=RATES["jitter"]), mid),
        "grayscale": (v2.RandomGrayscale(p=RATES["grayscale"]), red),
        "blur": (v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=BLUR_SIGMA)], p=RATES["blur"]), impulse),
        "solarize": (v2.RandomSolarize(threshold=0.5, p=RATES["solarize"]), bright),
    }
    for key, (transform, image) in transforms.items():
        fixture[f"rate.{key}"] = np.float64(rate(transform, image))
        fixture[f"rate.{key}_p"] = np.float64(RATES[key])
    fixture["rate.n"] = np.int64(N)


def deterministic_outputs(fixture: dict) -> None:
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 24, 24, generator=g)
    gray = torch.rand(1, 20, 20, generator=g)
    fixture["image.rgb"], fixture["image.gray"] = rgb.numpy(), gray.numpy()

    def put(name: str, out: torch.Tensor) -> None:
        fixture[f"out.{name}"] = out.numpy().astype(np.float32)

    put("flip_rgb", TF.horizontal_flip(rgb))
    for mode in ("bilinear", "bicubic"):
        interpolation = v2.InterpolationMode(mode)
        for box, size in (((3, 5, 17, 13), 12), ((2, 4, 9, 11), 20), ((0, 0, 24, 24), 16)):
            key = f"resized_crop_{mode}_{'_'.join(map(str, box))}_to_{size}"
            put(key, TF.resized_crop(rgb, *box, size=[size, size], interpolation=interpolation, antialias=True))
    # Colour jitter at fixed factors, in onepoch's fixed order brightness, contrast, saturation, hue.
    for i, (b, c, s, h) in enumerate(((1.3, 0.7, 1.25, 0.08), (0.65, 1.35, 0.6, -0.1), (1.0, 1.0, 1.0, 0.45))):
        fixture[f"out.jitter_{i}_factors"] = np.array([b, c, s, h])
        for name, image in (("rgb", rgb), ("gray", gray)):
            out = TF.adjust_contrast(TF.adjust_brightness(image, b), c)
            if name == "rgb":
                out = TF.adjust_hue(TF.adjust_saturation(out, s), h)
            put(f"jitter_{i}_{name}", out)
    put("grayscale_rgb", TF.rgb_to_grayscale(rgb, num_output_channels=3))
    for threshold in (0.5, 0.3):
        put(f"solarize_{threshold}_rgb", TF.solarize(rgb, threshold))
    for sigma in (0.5, 1.0, 1.7):
        radius = math.ceil(3 * sigma)   # onepoch truncates the kernel at ceil(3 sigma_max)
        for name, image in (("rgb", rgb), ("gray", gray)):
            put(f"blur_{sigma}_{name}", TF.gaussian_blur(image, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma]))


def main() -> None:
    torch.manual_seed(0)
    fixture: dict[str, np.ndarray] = {
        "meta.versions": np.array(f"torch {torch.__version__}, torchvision {torchvision.__version__}")}
    crop_statistics(fixture)
    factor_statistics(fixture)
    rate_statistics(fixture)
    deterministic_outputs(fixture)
    np.savez_compressed(OUT, **fixture)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(fixture)} arrays)")


if __name__ == "__main__":
    main()
