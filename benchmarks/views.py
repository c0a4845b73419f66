"""Benchmark: patches/s of the EMP-SSL CIFAR view recipe, batched (onepoch.views) vs per-sample.

The references are measured in the same run, on the same images:
  * Pillow: one image at a time, the recipe written with Pillow ops (what EMP-SSL's data loader
    does per worker), ending in a normalised float tensor like ours;
  * torchvision transforms (when torchvision imports): the same recipe as torchvision.transforms
    on PIL images, as in the EMP-SSL code.
Both references run in one process; onepoch runs with torch's threads on the chosen device (and,
on CPU, also with one thread, for a per-core comparison).

    python benchmarks/views.py                      # synthetic 32x32 images
    python benchmarks/views.py --data data/cifar10  # the first images of a prepared dataset
    python benchmarks/views.py --smoke              # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from onepoch.views import PRESETS, make_views

SPEC = PRESETS["emp_ssl_cifar"]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def synthetic_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth coloured images with noise (uint8 n x size x size x 3), a stand-in for CIFAR."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3))
    for i in range(n):
        for c in range(3):
            f = rng.uniform(0.5, 3, 2)
            out[i, :, :, c] = 0.5 + 0.4 * np.sin(2 * np.pi * (f[0] * yy + f[1] * xx) + rng.uniform(0, 6))
    out += rng.normal(0, 0.08, out.shape)
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Per-sample references
# ------------------------------------------------------------------------------------------------


def _pil_hue(img: Image.Image, shift: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    h = Image.fromarray((np.asarray(h, np.int16) + int(round(shift * 255))).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def pillow_view(img: Image.Image, rng: random.Random, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """One EMP-SSL CIFAR patch with Pillow: 0.25-area square crop -> 32x32, flip .5,
    colour jitter .4/.4/.4/.2 (random order) with p .8, grayscale .2, blur .1, solarize .1."""
    w, h = img.size
    side = int(round((0.25 * w * h) ** 0.5))
    left, top = rng.randint(0, w - side), rng.randint(0, h - side)
    out = img.crop((left, top, left + side, top + side)).resize((SPEC.size, SPEC.size), Image.BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        ops = [
            lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4)),
            lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 1.4)),
            lambda im: ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4)),
            lambda im: _pil_hue(im, rng.uniform(-0.2, 0.2)),
        ]
        rng.shuffle(ops)
        for op in ops:
            out = op(out)
    if rng.random() < 0.2:
        out = out.convert("L").convert("RGB")
    if rng.random() < 0.1:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 2.0)))
    if rng.random() < 0.1:
        out = ImageOps.solarize(out, 128)
    t = torch.from_numpy(np.array(out)).permute(2, 0, 1).float().div_(255)
    return t.sub_(mean).div_(std)


def torchvision_transform():
    """The EMP-SSL recipe with torchvision.transforms, or None when torchvision does not import."""
    try:
        import torchvision.transforms as T
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None

    class Blur:
        def __call__(self, im):
            return im.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0))) if random.random() < 0.1 else im

    return T.Compose([
        T.RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1, 1)),
        T.RandomHorizontalFlip(0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8),
        T.RandomGrayscale(0.2),
        Blur(),
        T.RandomSolarize(128, p=0.1),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


ROUNDS = 5  # each rate is the best of this many rounds: the machine's noise only slows things down


def best_rate(run_batch, min_seconds: float, sync=lambda: None) -> float:
    """Best patches/s over ROUNDS rounds of ``run_batch() -> patches made``, each lasting at
    least ``min_seconds / ROUNDS`` (and at least one batch)."""
    best = 0.0
    for _ in range(ROUNDS):
        sync()
        done, start = 0, time.perf_counter()
        while True:
            done += run_batch()
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / ROUNDS:
                break
        best = max(best, done / elapsed)
    return best


def time_per_sample(fn, images: list[Image.Image], patches: int, min_seconds: float) -> float:
    """Patches/s of ``fn(image) -> tensor``, ``patches`` views per image, stacked into one batch."""
    return best_rate(lambda: torch.stack([fn(im) for _ in range(patches) for im in images]).shape[0],
                     min_seconds)


def time_batched(images: torch.Tensor, spec, device: torch.device, min_seconds: float) -> float:
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # warm-up
        make_views(images, spec, g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return best_rate(lambda: make_views(images, spec, g).shape[0], min_seconds, sync)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="prepared dataset directory (default: synthetic 32x32 images)")
    ap.add_argument("--batch", type=int, default=100, help="images per batch (default 100)")
    ap.add_argument("--patches", type=int, default=20, help="views per image (default 20)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--seconds", type=float, default=5.0,
                    help=f"minimum time per measurement, split into {ROUNDS} rounds (default 5)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--smoke", action="store_true", help="8 images, 2 patches, 0.05 s per measurement: checks that it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.patches, args.seconds = 8, 2, 0.05

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.data:
        from onepoch.data import open_split

        split = open_split(args.data, "train")
        if split.shape != (32, 32, 3):
            sys.exit(f"benchmark needs 32x32 RGB images, {args.data} has {split.shape}")
        array = np.array(split.images[: args.batch])
        source = args.data
    else:
        array = synthetic_images(args.batch)
        source = "synthetic"
    spec = dataclasses.replace(SPEC, count=args.patches, mean=MEAN, std=STD)
    pil_images = [Image.fromarray(a) for a in array]
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references are single-process, single-thread
    rng = random.Random(0)
    ref_pil = time_per_sample(lambda im: pillow_view(im, rng, mean, std), pil_images, args.patches, args.seconds)
    tv = torchvision_transform()
    ref_tv = time_per_sample(tv, pil_images, args.patches, args.seconds) if tv is not None else None
    torch.set_num_threads(threads)

    images = torch.from_numpy(array).to(device)
    rows = [("pillow per-sample (1 process)", ref_pil)]
    if ref_tv is not None:
        rows.append(("torchvision per-sample (1 process)", ref_tv))
    ours = time_batched(images, spec, device, args.seconds)
    label = f"onepoch.views batched ({device.type}"
    rows.append((label + (f", {threads} threads)" if device.type == "cpu" else ")"), ours))
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        rows.append((label + ", 1 thread)", time_batched(images, spec, device, args.seconds)))
        torch.set_num_threads(threads)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    print(f"EMP-SSL CIFAR recipe: {args.patches} patches/image x {args.batch} images, 32x32, on {name}; "
          f"images: {source}; torch {torch.__version__}")
    print(f"{'pipeline':44s} {'patches/s':>12s} {'vs pillow':>10s}")
    for label, rate in rows:
        print(f"{label:44s} {rate:12,.0f} {rate / ref_pil:9.1f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": name, "torch": torch.__version__, "source": source,
                       "patches_per_image": args.patches, "batch": args.batch,
                       "rates": {label: rate for label, rate in rows},
                       "ratio_vs_pillow": ours / ref_pil}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
