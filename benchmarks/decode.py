"""Benchmark: images/s delivering EMP-SSL batches from JPEG files: decode once, crop many, against
per-sample pipelines, measured in the same run on the same JPEGs.

A batch is ``--batch`` images x ``--views`` views of ``--size`` pixels (default 100 x 20 at 224x224,
EMP-SSL's ImageNet recipe: 0.25-area crops, bicubic, flip, colour jitter, grayscale, blur, solarize,
normalised), delivered as one float tensor. Pipelines:

* **onepoch**: JPEG at rest (``onepoch.data.encoded``): each image decoded once per step, at the
  smallest DCT scale its crops need, in a thread pool; all views rendered by the batched view code
  (``onepoch.views.encoded``);
* **decode per view** (what FFCV-SSL's loader does): each view decodes its JPEG again, at full scale,
  then the same batched rendering;
* **onepoch without the fast extra**: the same, with ``ONEPOCH_CPU_KERNELS=torch`` and
  ``ONEPOCH_JPEG_DECODER=pillow`` (only when the ``fast`` extra is installed: then the row above uses the
  fused kernels of ``onepoch.views.kernels`` and simplejpeg's decoder);
* **per-sample** (what EMP-SSL's code does): a torch DataLoader with ``--workers`` worker processes,
  each image decoded once with Pillow, then one crop + jitter chain per view in Pillow, stacked.

Images: an npz of JPEG bytes (``--npz``, e.g. the Imagenette file: ``train_jpeg``/``train_offsets``),
else generated ImageNet-like JPEGs (~500x375, smooth fields plus texture, quality 90).

    python benchmarks/decode.py                                   # generated JPEGs, 224x224 views
    python benchmarks/decode.py --size 96                         # STL-10-sized views
    python benchmarks/decode.py --npz imagenette-224-jpeg.npz     # real photographs
    python benchmarks/decode.py --smoke                           # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).parent))
from views import _pil_hue  # noqa: E402  (the Pillow hue op of the views benchmark)

from onepoch.data.encoded import EncodedSource, decode_image, jpeg_decoder, pad_into_canvas  # noqa: E402
from onepoch.data.loader import EncodedBatch  # noqa: E402
from onepoch.data.prepared import SourceData, open_split, write_prepared  # noqa: E402
from onepoch.views import ViewSpec, apply_view_params, sample_view_params, seeded_generator  # noqa: E402
from onepoch.views import kernels as colour_kernels  # noqa: E402
from onepoch.views.encoded import device_jpeg_decoder, finish_encoded_views, start_encoded_views  # noqa: E402

MEAN = STD = (0.5, 0.5, 0.5)
PLAIN_ROW = "onepoch without the fast extra"


def emp_ssl_imagenet_spec(size: int, views: int) -> ViewSpec:
    """EMP-SSL's ImageNet patch recipe (its aug4img.py) at ``size`` pixels."""
    return ViewSpec(count=views, size=size, crop_scale=(0.25, 0.25), crop_ratio=(3 / 4, 4 / 3),
                    interpolation="bicubic", flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4,
                    saturation=0.4, hue=0.2, grayscale_p=0.2, blur_p=0.1, blur_sigma=(0.1, 2.0),
                    solarize_p=0.1, mean=MEAN, std=STD)


def generated_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """ImageNet-like JPEGs: about 500x375 (both orientations), smooth colour fields plus texture."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(rng.integers(440, 520)), int(rng.integers(330, 390)))
        if rng.random() < 0.25:
            w, h = h, w
        field = Image.fromarray((rng.random((h // 24 + 2, w // 24 + 2, 3)) * 255).astype(np.uint8))
        a = np.asarray(field.resize((w, h), Image.BICUBIC), np.int16) + rng.integers(-14, 15, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def npz_jpegs(path: str, n: int) -> list[bytes]:
    with np.load(path, allow_pickle=False) as npz:
        data, offsets = npz["train_jpeg"], npz["train_offsets"]
        return [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(min(n, len(offsets) - 1))]


# ------------------------------------------------------------------------------------------------
# Per-sample reference (EMP-SSL's loader: a Dataset whose transform makes every view with Pillow)
# ------------------------------------------------------------------------------------------------


def _rrc_box(w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random):
    """torchvision's RandomResizedCrop.get_params on a w x h image."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return left, top, cw, ch
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, side, side


def pil_view(img: Image.Image, spec: ViewSpec, rng: random.Random) -> torch.Tensor:
    """One view with Pillow: crop + resize, flip, jitter (random order), grayscale, blur, solarize,
    ToTensor, normalise."""
    from PIL import ImageEnhance

    left, top, cw, ch = _rrc_box(img.width, img.height, spec.crop_scale, spec.crop_ratio, rng)
    out = img.resize((spec.size, spec.size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    if rng.random() < spec.flip_p:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < spec.jitter_p:
        ops = [lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4)),
               lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 1.4)),
               lambda im: ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4)),
               lambda im: _pil_hue(im, rng.uniform(-spec.hue, spec.hue))]
        rng.shuffle(ops)
        for op in ops:
            out = op(out)
    if rng.random() < spec.grayscale_p:
        out = out.convert("L").convert("RGB")
    if rng.random() < spec.blur_p:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(*spec.blur_sigma)))
    if rng.random() < spec.solarize_p:
        out = ImageOps.solarize(out, 128)
    t = torch.from_numpy(np.array(out)).permute(2, 0, 1).float().div_(255)
    return t.sub_(0.5).div_(0.5)


class PerSampleDataset(torch.utils.data.Dataset):
    def __init__(self, jpegs: list[bytes], spec: ViewSpec):
        self.jpegs, self.spec = jpegs, spec

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")
        rng = random.Random(i)
        return torch.stack([pil_view(img, self.spec, rng) for _ in range(self.spec.count)])


def _one_thread_worker(_: int) -> None:
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# Timed pipelines: each returns seconds for the whole list of batches
# ------------------------------------------------------------------------------------------------


def time_onepoch(images, batches: list[np.ndarray], spec: ViewSpec, threads: int, warmup: int,
                 device: torch.device = torch.device("cpu"), device_decode=None) -> float:
    """Seconds to deliver ``batches[warmup:]`` after the first ``warmup``, run as the trainer runs it:
    the next batch's decodes start before this one's views are delivered, into the buffers of the
    batch delivered before this one."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with ThreadPoolExecutor(threads) as pool:
        ahead = trained = training = None
        for step, index in enumerate(batches + [None]):
            pending = None if index is None else start_encoded_views(
                [EncodedBatch(images, index, index)], [spec], 0, step, pool, device_decode=device_decode,
                render_in_pool=device.type == "cpu", reuse=trained)
            if ahead is not None:
                finish_encoded_views(ahead, [spec], device)  # delivers batch step - 1
                trained, training = training, ahead
            if step == warmup:  # the warm-up batches are delivered (and the next one's decodes started)
                sync()
                start = time.perf_counter()
            ahead = pending
        sync()
        return time.perf_counter() - start


def time_decode_per_view(images, batches: list[np.ndarray], spec: ViewSpec, threads: int, warmup: int) -> float:
    """Every view decodes its image again (full scale), then the batched rendering, view by view."""
    one = ViewSpec(**{**spec.__dict__, "count": 1})
    with ThreadPoolExecutor(threads) as pool:
        for step, index in enumerate(batches):
            if step == warmup:
                start = time.perf_counter()
            sizes = images.image_sizes(index)
            for v in range(spec.count):
                decoded = list(pool.map(lambda i: decode_image(images.encoded(int(i))), index))
                canvas = torch.from_numpy(pad_into_canvas(decoded))
                params = sample_view_params(one, len(index), sizes[:, 0], sizes[:, 1], seeded_generator(0, step, v))
                apply_view_params(canvas, params, one)
        return time.perf_counter() - start


def time_per_sample(jpegs: list[bytes], batch: int, spec: ViewSpec, workers: int, warmup: int) -> float:
    """Seconds for the batches after the first ``warmup`` (workers started and busy)."""
    loader = torch.utils.data.DataLoader(PerSampleDataset(jpegs, spec), batch_size=batch, num_workers=workers,
                                         worker_init_fn=_one_thread_worker if workers else None)
    for step, _ in enumerate(loader):
        if step == warmup - 1:
            start = time.perf_counter()
    return time.perf_counter() - start


def gpu_rows(images, batches, spec: ViewSpec, threads: int, warmup: int, device: torch.device,
             nvjpeg) -> list[tuple[str, float]]:
    """The GPU pipelines' rows: views rendered on the device from host decodes, and from nvJPEG
    decodes where torchvision offers them. A pipeline that fails is reported on stderr and left out,
    so that the rows measured before it are still printed."""
    rows = []
    pipelines = [("onepoch, views on the GPU", None)]
    if nvjpeg is not None:
        pipelines.append(("onepoch, nvJPEG + views on the GPU", nvjpeg))
    for label, decoder in pipelines:
        try:
            rows.append((label, time_onepoch(images, batches, spec, threads, warmup, device, decoder)))
        except Exception as exc:  # noqa: BLE001 - a benchmark row that failed: say so, keep the others
            print(f"{label}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--npz", help="an npz of JPEG bytes (train_jpeg, train_offsets); default: generated JPEGs")
    ap.add_argument("--batch", type=int, default=100, help="images per batch (default 100)")
    ap.add_argument("--views", type=int, default=20, help="views per image (default 20)")
    ap.add_argument("--size", type=int, default=224, help="view size in pixels (default 224; 96 for STL-10)")
    ap.add_argument("--batches", type=int, default=4, help="batches timed per pipeline (default 4; keep it a multiple "
                    "of --workers, or the per-sample pipeline is timed with idle workers at the end)")
    ap.add_argument("--warmup", type=int, default=3, help="batches delivered before the timing starts, so that "
                    "each pipeline is measured in its steady state: workers started, buffers reused (default 3: "
                    "onepoch renders a batch into the buffers of the batch delivered before the previous one, "
                    "as the trainer does, so fresh memory is first written again by the 4th batch)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-sample pipeline (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="onepoch's decode threads (default: one per core)")
    ap.add_argument("--device", default="cpu", help="where onepoch renders the views: cpu (default) or cuda "
                    "(then also with nvJPEG decoding where torchvision offers it)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--smoke", action="store_true", help="8 images, 2 views of 32x32: checks that it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.views, args.size, args.batches, args.warmup, args.workers = 4, 2, 32, 2, 1, 0
    if args.warmup < 1 or args.batches < 1:
        ap.error("--warmup and --batches must be at least 1")
    threads = args.threads or os.cpu_count() or 1
    n = args.batch * (args.warmup + args.batches)
    jpegs = npz_jpegs(args.npz, n) if args.npz else generated_jpegs(n)
    if len(jpegs) < n:
        sys.exit(f"{args.npz} has only {len(jpegs)} images; need {n}")
    source = Path(args.npz).name if args.npz else "generated ~500x375"
    spec = emp_ssl_imagenet_spec(args.size, args.views)

    with tempfile.TemporaryDirectory() as tmp:
        records = [(f"image {i}", data, 0) for i, data in enumerate(jpegs)]
        os.environ.setdefault("ONEPOCH_PROGRESS", "0")
        write_prepared(SourceData("bench", {"train": EncodedSource(n, lambda: iter(records))}, ["x"], "bench"),
                       Path(tmp) / "ds")
        images = open_split(Path(tmp) / "ds", "train").images
        batches = [np.arange(b * args.batch, (b + 1) * args.batch) for b in range(args.warmup + args.batches)]
        w = args.warmup
        rows = [("per-sample (DataLoader, Pillow)", time_per_sample(jpegs, args.batch, spec, args.workers, w)),
                ("decode per view (FFCV-SSL style)", time_decode_per_view(images, batches, spec, threads, w)),
                ("onepoch: decode once, crop many", time_onepoch(images, batches, spec, threads, w))]
        fast = {"ONEPOCH_CPU_KERNELS": "torch"} if colour_kernels.available() else {}
        if jpeg_decoder() == "simplejpeg":
            fast["ONEPOCH_JPEG_DECODER"] = "pillow"
        if fast:  # the same pipeline with what the fast extra replaces: eager torch colour ops, Pillow decoding
            os.environ.update(fast)
            try:
                rows.append((PLAIN_ROW, time_onepoch(images, batches, spec, threads, w)))
            finally:
                for name in fast:
                    os.environ.pop(name)
        device = torch.device(args.device)
        if device.type == "cuda":
            rows += gpu_rows(images, batches, spec, threads, w, device, device_jpeg_decoder(device))
    timed = args.batch * args.batches
    rates = {label: timed / seconds for label, seconds in rows}
    ref = rates["per-sample (DataLoader, Pillow)"]
    kernels = "numba kernels" if colour_kernels.available() else "eager torch"
    print(f"{args.batches} batches (after {args.warmup} to warm up) of {args.batch} images x {args.views} views of {args.size}x{args.size} "
          f"(EMP-SSL ImageNet recipe) from {source} JPEGs, on CPU ({os.cpu_count()} cores; onepoch: {threads} "
          f"decode threads, {torch.get_num_threads()} torch threads, colour ops: {kernels}, JPEG decoder: "
          f"{jpeg_decoder()}; per-sample: {args.workers} workers); torch {torch.__version__}")
    print(f"{'pipeline':36s} {'images/s':>10s} {'vs per-sample':>14s}")
    for label, rate in rates.items():
        print(f"{label:36s} {rate:10.1f} {rate / ref:13.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"source": source, "batch": args.batch, "views": args.views, "size": args.size,
                       "batches": args.batches, "warmup": args.warmup, "workers": args.workers, "threads": threads,
                       "device": args.device, "colour_ops": kernels, "jpeg_decoder": jpeg_decoder(),
                       "images_per_s": rates,
                       "ratio_vs_per_sample": rates["onepoch: decode once, crop many"] / ref},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
