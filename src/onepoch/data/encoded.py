"""JPEG at rest: large-image splits kept as their encoded bytes, decoded at the scale a step needs.

Layout of an encoded split directory (``meta.json`` has ``"layout": "jpeg"``)::

    <split>/encoded.bin     the JPEG files one after another
    <split>/offsets.npy     int64 (N + 1,): image i is encoded.bin[offsets[i]:offsets[i + 1]]
    <split>/sizes.npy       int32 (N, 2): height, width of each image as stored
    <split>/labels.npy      int64 (N,)

``encoded.bin`` is memory-mapped, so a split larger than RAM is read from the page cache as needed.

What is stored (decided per image by :func:`normalize_image`): a baseline or progressive JPEG in RGB
or grayscale, no larger than ``max_side`` and without an EXIF rotation, is kept byte for byte (a
grayscale JPEG is turned into RGB when decoded, exactly, by repeating its channel). Every other image
(PNG, palette, CMYK, an EXIF-rotated or oversized JPEG) is decoded, turned upright, converted to RGB,
shrunk so that its longer side is ``max_side`` (Pillow's bicubic with antialiasing) and encoded again
as a JPEG of quality ``quality`` (4:4:4: no chroma subsampling). So every record decodes to an upright RGB image.

Decoding: :func:`decode_image` with ``reduce`` r in {1, 2, 4, 8} uses libjpeg's scaled DCT (through
simplejpeg when installed, the ``fast`` extra, else Pillow's ``draft``; the same pixels either way) and
returns the image at ``ceil(H / r) x ceil(W / r)``, several times faster than a full decode followed by a
resize. :func:`reduction_for` picks, per image, the largest r at which every
crop of a step still has at least the output size in pixels: decode once per image per step, at the
smallest scale its crops need, and render all its views from that one decode.
"""

from __future__ import annotations

import functools
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

from onepoch.data.checksum import array_sha256, check_stamp, file_stamp, sha256_file
from onepoch.errors import ConfigError, DataError, one_line
from onepoch.progress import progress

REDUCTIONS = (1, 2, 4, 8)  # the scales libjpeg's DCT can decode at
DEFAULT_QUALITY = 95
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_ORIENTATION = 0x0112


def _open(data: bytes | memoryview, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except _DECODE_ERRORS as e:
        raise DataError(f"{name}: not a readable image ({one_line(e)})") from None


def _load(img: Image.Image, name: str) -> None:
    try:
        img.load()
    except _DECODE_ERRORS as e:
        raise DataError(f"{name}: cannot decode ({one_line(e)})") from None


def normalize_image(data: bytes, name: str, *, max_side: int | None = None,
                    quality: int = DEFAULT_QUALITY) -> tuple[bytes, int, int]:
    """``(jpeg bytes, height, width)`` of one image to store (the module docstring says what is kept
    and what is encoded again). The whole image is decoded to check it: a corrupt or truncated file
    raises :class:`DataError` naming ``name``."""
    img = _open(data, name)
    orientation = img.getexif().get(_ORIENTATION, 1) if img.format == "JPEG" else 1
    keep = (img.format == "JPEG" and img.mode in ("RGB", "L") and orientation in (0, 1)
            and (max_side is None or max(img.size) <= max_side))
    _load(img, name)
    if keep:
        return bytes(data), img.height, img.width
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)  # transparent pixels on white, as browsers show them
        img = img.convert("RGB")
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality, subsampling=0)  # 4:4:4: no chroma loss on top of the re-encode
    return out.getvalue(), img.height, img.width


JPEG_DECODERS = ("auto", "simplejpeg", "pillow")


def jpeg_decoder() -> str:
    """``simplejpeg`` or ``pillow``: the JPEG decoder of :func:`decode_image`, by ``ONEPOCH_JPEG_DECODER``:
    ``auto`` (the default: simplejpeg when it imports), ``simplejpeg`` (required) or ``pillow``."""
    choice = os.environ.get("ONEPOCH_JPEG_DECODER", "auto").strip().lower() or "auto"
    if choice not in JPEG_DECODERS:
        raise ConfigError(f"ONEPOCH_JPEG_DECODER={choice!r} is not one of {', '.join(JPEG_DECODERS)}")
    if choice == "pillow":
        return "pillow"
    if _simplejpeg() is None:
        if choice == "simplejpeg":
            raise ConfigError('ONEPOCH_JPEG_DECODER=simplejpeg but simplejpeg is not installed: '
                              'pip install "onepoch[fast]"')
        return "pillow"
    return "simplejpeg"


@functools.lru_cache(maxsize=None)
def _simplejpeg() -> Any:
    """The simplejpeg module, or None when it does not import (tried once per process)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def decode_image(data: bytes | memoryview, reduce: int = 1, name: str = "image") -> np.ndarray:
    """An encoded image as uint8 RGB ``(h, w, 3)``; ``reduce`` r > 1 decodes a JPEG at 1/r scale through
    libjpeg's scaled DCT, giving ``ceil(H / r) x ceil(W / r)`` pixels. JPEGs in YCbCr or grayscale go
    through simplejpeg where :func:`jpeg_decoder` says so (the same libjpeg-turbo DCT and upsampling as
    Pillow, the same pixels, tested; 1.3-1.8x faster, straight into a numpy array), everything else
    through Pillow (``draft`` for the reduced scales)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce}")
    if jpeg_decoder() == "simplejpeg":
        decoded = _decode_simplejpeg(data, reduce, name)
        if decoded is not None:
            return decoded
    img = _open(data, name)
    if reduce > 1 and img.format == "JPEG":
        img.draft(img.mode, (img.width // reduce, img.height // reduce))
    _load(img, name)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def _decode_simplejpeg(data: bytes | memoryview, reduce: int, name: str) -> np.ndarray | None:
    """:func:`decode_image` by simplejpeg, or None for what it leaves to Pillow: not a JPEG, a colour
    space other than YCbCr and gray, or a side under 8 pixels (where a smaller DCT scale could give the
    same size, and other pixels than Pillow's)."""
    simplejpeg = _simplejpeg()
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # not a JPEG, or a header it cannot read: Pillow decodes it or says why not
    if colorspace not in ("YCbCr", "Gray") or min(height, width) < 8:
        return None
    try:
        return simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // reduce), min_width=-(-width // reduce),
                                      min_factor=reduce)
    except ValueError as e:
        raise DataError(f"{name}: cannot decode ({one_line(e)})") from None


def reduction_for(min_side: np.ndarray, out_size: int) -> np.ndarray:
    """Per image, the largest r in (1, 2, 4, 8) with ``min_side / r >= out_size``: every crop (whose
    shorter side is at least ``min_side`` pixels) still has the output size after a 1/r decode."""
    min_side = np.asarray(min_side)
    r = np.ones(min_side.shape, np.int64)
    for k in REDUCTIONS[1:]:
        r = np.where(min_side >= k * out_size, k, r)
    return r


def scale_crops(crop: np.ndarray, full: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Crop boxes ``(N, 4)`` top, left, height, width in full-size pixels of images ``full`` (N, 2)
    (height, width) moved onto the same images decoded at ``decoded`` (N, 2): the box scaled by the
    decoded/full ratio, rounded, at least one pixel and inside the image."""
    crop = np.asarray(crop, np.float64)
    sy = decoded[:, 0] / full[:, 0]
    sx = decoded[:, 1] / full[:, 1]
    h = np.clip(np.round(crop[:, 2] * sy), 1, decoded[:, 0]).astype(np.int64)
    w = np.clip(np.round(crop[:, 3] * sx), 1, decoded[:, 1]).astype(np.int64)
    top = np.clip(np.floor(crop[:, 0] * sy), 0, decoded[:, 0] - h).astype(np.int64)
    left = np.clip(np.floor(crop[:, 1] * sx), 0, decoded[:, 1] - w).astype(np.int64)
    return np.stack([top, left, h, w], 1)


def pad_into_canvas(images: list[np.ndarray]) -> np.ndarray:
    """Images of different sizes ``(h_i, w_i, 3)`` in one zero-padded uint8 batch ``(B, max h, max w, 3)``,
    each in the top-left corner."""
    h = max(a.shape[0] for a in images)
    w = max(a.shape[1] for a in images)
    canvas = np.zeros((len(images), h, w, 3), np.uint8)
    for i, a in enumerate(images):
        canvas[i, :a.shape[0], :a.shape[1]] = a
    return canvas


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The evaluation view: shorter side resized to ``size`` (Pillow bilinear with antialiasing), then
    the centre ``size x size`` (torchvision's ``Resize(size)`` + ``CenterCrop(size)``)."""
    h, w = image.shape[:2]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
        top, left = (nh - size) // 2, (nw - size) // 2
        image = image[top:top + size, left:left + size]
    return image


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class EncodedImages:
    """The images of an encoded split, array-like for the code that reads uint8 batches: ``images[i]``,
    ``images[a:b]`` and ``images[index_array]`` decode (in ``threads`` threads) to uint8
    ``(n, size, size, 3)`` at the evaluation resolution ``size`` (:func:`resize_center_crop`), so
    ``shape`` is ``(N, size, size, 3)``. Training reads the bytes itself (:meth:`encoded`) and decodes
    at the scale each step's crops need."""

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, data: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, size: int,
                 threads: int | None = None, rows: np.ndarray | None = None):
        self.data, self.offsets, self.sizes = data, offsets, sizes
        self.size = int(size)
        self.threads = threads or default_threads()
        self.rows = rows  # a subset's rows of the stored split (None: all)

    @classmethod
    def open(cls, directory: Path, size: int, threads: int | None = None) -> "EncodedImages":
        try:
            data = np.load(directory / "offsets.npy", allow_pickle=False)
            sizes = np.load(directory / "sizes.npy", allow_pickle=False)
            blob = np.memmap(directory / "encoded.bin", dtype=np.uint8, mode="r") \
                if (directory / "encoded.bin").stat().st_size else np.zeros(0, np.uint8)
        except (OSError, ValueError) as e:
            raise DataError(f"{directory}: cannot read the encoded images ({one_line(e)})") from None
        if data.dtype != np.int64 or data.ndim != 1 or sizes.shape != (data.shape[0] - 1, 2) \
                or data[0] != 0 or data[-1] != blob.shape[0] or np.any(np.diff(data) <= 0):
            raise DataError(f"{directory}: offsets.npy / sizes.npy do not describe encoded.bin "
                            "(the split is damaged; prepare it again)")
        return cls(blob, data, sizes.astype(np.int64), size, threads)

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.offsets) - 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.size, self.size, 3)

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded images (what a resident copy would hold)."""
        if self.rows is None:
            return int(self.offsets[-1])
        return int((self.offsets[self.rows + 1] - self.offsets[self.rows]).sum())

    def stored_row(self, i: int | np.ndarray) -> Any:
        return i if self.rows is None else self.rows[i]

    def encoded(self, i: int) -> memoryview:
        """The stored bytes of image ``i`` (no copy: a view of the memory map)."""
        r = int(self.stored_row(i))
        return memoryview(self.data[self.offsets[r]:self.offsets[r + 1]])

    def image_sizes(self, index: np.ndarray) -> np.ndarray:
        """(n, 2) height, width of images ``index`` as stored."""
        return self.sizes[self.stored_row(np.asarray(index, np.int64))]

    def decode(self, index: Iterable[int], reduce: Iterable[int] | int = 1) -> list[np.ndarray]:
        """Images ``index`` decoded at 1/``reduce`` scale (per image or one for all), in order, in a
        thread pool (the result does not depend on the number of threads)."""
        index = [int(i) for i in index]
        reduce = [int(r) for r in reduce] if not isinstance(reduce, int) else [reduce] * len(index)

        def one(k: int) -> np.ndarray:
            return decode_image(self.encoded(index[k]), reduce[k], name=f"image {index[k]}")

        if self.threads <= 1:
            return [one(k) for k in range(len(index))]
        with ThreadPoolExecutor(self.threads) as pool:
            return list(pool.map(one, range(len(index))))

    def __getitem__(self, key: Any) -> np.ndarray:
        index = np.arange(len(self))[key]
        single = np.ndim(index) == 0
        index = np.atleast_1d(index)
        sizes = self.image_sizes(index)
        reduce = reduction_for(sizes.min(1), self.size)
        decoded = self.decode(index, reduce)
        out = np.empty((len(index), self.size, self.size, 3), np.uint8)
        for k, image in enumerate(decoded):
            out[k] = resize_center_crop(image, self.size)
        return out[0] if single else out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def subset(self, count: int) -> "EncodedImages":
        rows = np.arange(len(self))[:count] if self.rows is None else self.rows[:count]
        return EncodedImages(self.data, self.offsets, self.sizes, self.size, self.threads, rows)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


@dataclass
class EncodedSource:
    """What a large-image source gives for one split: ``count`` records from ``records()``, each
    ``(name, data, label)`` with ``data`` the file's bytes (or a path to read them from)."""

    count: int
    records: Callable[[], Iterator[tuple[str, bytes | os.PathLike, int]]]


STATS_SIDE = 64  # channel statistics are measured on each image decoded at about this shorter side


def write_encoded_split(directory: Path, source: EncodedSource, num_classes: int, *, max_side: int | None,
                        quality: int, threads: int | None = None, desc: str = "encode") -> dict[str, Any]:
    """Write one encoded split into ``directory`` (streaming: memory stays bounded whatever the size).
    Returns the meta.json entries it measured: num_images, mean, std, sha256, re-encoded count."""

    threads = threads or default_threads()
    if source.count == 0:
        raise DataError(f"{desc}: the split is empty")

    def prepare(record: tuple[str, bytes | os.PathLike, int]) -> tuple[bytes, int, int, np.ndarray, np.ndarray, bool]:
        name, data, label = record
        if not isinstance(data, (bytes, bytearray, memoryview)):
            try:
                data = Path(data).read_bytes()
            except OSError as e:
                raise DataError(f"{name}: cannot read ({one_line(e)})") from None
        stored, h, w = normalize_image(bytes(data), name, max_side=max_side, quality=quality)
        small = decode_image(stored, int(reduction_for(np.array(min(h, w)), STATS_SIDE)), name).reshape(-1, 3)
        small = small.astype(np.float64) / 255
        return stored, h, w, np.stack([small.sum(0), (small * small).sum(0)]), np.array([small.shape[0]]), \
            bytes(data) != stored

    offsets = [0]
    sizes, labels = [], []
    sums = np.zeros((2, 3))
    pixels = 0
    reencoded = 0
    with open(directory / "encoded.bin", "wb") as out, ThreadPoolExecutor(threads) as pool, \
            progress(total=source.count, desc=desc, unit="img") as bar:
        records = source.records()
        pending: list = []

        def drain(limit: int) -> None:
            nonlocal pixels, reencoded
            while len(pending) > limit:
                future, label = pending.pop(0)
                stored, h, w, s, n, changed = future.result()
                out.write(stored)
                offsets.append(offsets[-1] + len(stored))
                sizes.append((h, w))
                labels.append(label)
                sums[:] += s
                pixels += int(n[0])
                reencoded += bool(changed)
                bar.update(1)

        for record in records:
            label = int(record[2])
            if not 0 <= label < num_classes:
                raise DataError(f"{record[0]}: label {label} is outside [0, {num_classes - 1}]")
            pending.append((pool.submit(prepare, record), label))
            drain(4 * threads)
        drain(0)
    if len(labels) != source.count:
        raise DataError(f"{desc}: expected {source.count} images, the source gave {len(labels)}")
    np.save(directory / "offsets.npy", np.asarray(offsets, np.int64))
    np.save(directory / "sizes.npy", np.asarray(sizes, np.int32).reshape(-1, 2))
    labels_array = np.asarray(labels, np.int64)
    np.save(directory / "labels.npy", labels_array)
    mean = sums[0] / pixels
    std = np.sqrt(np.maximum(sums[1] / pixels - mean * mean, 0.0))
    return {
        "num_images": len(labels),
        "mean": [round(float(m), 6) for m in mean],
        "std": [round(float(s), 6) for s in std],
        "reencoded": reencoded,
        "sha256": {"encoded": sha256_file(directory / "encoded.bin"),
                   "offsets": array_sha256(np.asarray(offsets, np.int64)),
                   "sizes": array_sha256(np.asarray(sizes, np.int32).reshape(-1, 2)),
                   "labels": array_sha256(labels_array)},
        "stamps": {"encoded.bin": file_stamp(directory / "encoded.bin")},
    }


def verify_encoded_split(directory: Path, meta: dict[str, Any]) -> None:
    """Re-hash an encoded split's files against ``meta`` (DataError naming the file that changed)."""

    expected = meta.get("sha256")
    for key in ("encoded", "offsets", "sizes", "labels"):
        if not isinstance(expected, dict) or key not in expected:
            raise DataError(f"{directory / 'meta.json'} records no sha256 of {key} (prepare it again)")
    full = check_stamp(directory / "encoded.bin", meta.get("stamps", {}).get("encoded.bin"))
    if full and sha256_file(directory / "encoded.bin") != expected["encoded"]:
        raise DataError(f"{directory / 'encoded.bin'}: checksum does not match meta.json "
                        "(the file changed after it was prepared; prepare it again)")
    for key, dtype in (("offsets", np.int64), ("sizes", np.int32), ("labels", np.int64)):
        arr = np.load(directory / f"{key}.npy", allow_pickle=False)
        if arr.dtype != dtype or array_sha256(arr) != expected[key]:
            raise DataError(f"{directory / (key + '.npy')}: checksum does not match meta.json "
                            "(the file changed after it was prepared; prepare it again)")


def eval_size_default(max_side: int | None, sizes: np.ndarray) -> int:
    """The default evaluation resolution of a split: 224 (ImageNet's), or the median shorter side when
    the images are smaller."""
    median = int(np.median(sizes.min(1))) if len(sizes) else 224
    return int(min(224, median, max_side or 224)) if median else 224


__all__ = ["EncodedImages", "EncodedSource", "decode_image", "normalize_image", "reduction_for", "scale_crops",
           "pad_into_canvas", "resize_center_crop", "write_encoded_split", "verify_encoded_split",
           "REDUCTIONS", "DEFAULT_QUALITY"]
