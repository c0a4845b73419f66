"""Datasets stored as one ``.npz`` file (always loaded with ``allow_pickle=False``).

Two layouts are understood:

- arrays: ``x_train``, ``y_train``, ``x_test``, ``y_test`` -- uint8 images (N, H, W) or
  (N, H, W, C) with C in {1, 3}, integer labels;
- JPEG bytes: ``train_jpeg``, ``train_offsets``, ``y_train``, ``test_jpeg``, ``test_offsets``,
  ``y_test`` -- image i of a split is the JPEG file ``X_jpeg[X_offsets[i]:X_offsets[i + 1]]``
  (uint8 bytes, int offsets of length N + 1 starting at 0 and ending at ``len(X_jpeg)``).

Both may carry ``class_names`` (strings); without it the classes are named "0".."K-1" with
K = max label + 1 over both splits. Labels must be integers >= 0. Array images are used as stored.
JPEG bytes are either decoded into raw arrays (:func:`read_npz`; all images of one size, grayscale or
CMYK ones among colour ones converted to RGB) or kept as they are, JPEG at rest (:func:`read_npz_encoded`).
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from onepoch.data.encoded import EncodedSource
from onepoch.data.prepared import SplitArrays, check_split
from onepoch.errors import DataError, one_line
from onepoch.progress import progress

SPLITS = ("train", "test")
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
JPEG_KEYS = ("train_jpeg", "train_offsets", "y_train", "test_jpeg", "test_offsets", "y_test")
CLASS_NAMES_KEY = "class_names"
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK"
_LOAD_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)


class _NpzArrays:
    """Read access to the arrays of an open npz, turning every read failure into a DataError."""

    def __init__(self, path: Path, npz: Any):
        self.path, self.npz = path, npz
        self.keys = set(npz.files)

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.npz[key]
        except _LOAD_ERRORS as e:
            raise DataError(f"{self.path}: cannot read array {key!r} ({one_line(e)})") from None


def detect_layout(path: Path, keys: set[str]) -> str:
    """"jpeg" or "arrays" from the array names present; DataError listing what is missing."""
    if keys & {"train_jpeg", "test_jpeg", "train_offsets", "test_offsets"}:
        layout, needed = "jpeg", JPEG_KEYS
    elif keys & {"x_train", "x_test"}:
        layout, needed = "arrays", ARRAY_KEYS
    else:
        raise DataError(
            f"{path}: unknown npz layout (arrays found: {', '.join(sorted(keys)) or 'none'}); "
            f"expected {', '.join(ARRAY_KEYS)} or {', '.join(JPEG_KEYS)}"
        )
    missing = [k for k in needed if k not in keys]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)} for the {layout} layout")
    return layout


def check_labels(path: Path, key: str, labels: np.ndarray) -> np.ndarray:
    """Labels as int64 (N,); they must be a 1-D integer array with values >= 0."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {key} must be a 1-D integer array, found {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: {key} has negative label {int(labels.min())}")
    return labels.astype(np.int64)


def check_offsets(path: Path, split: str, offsets: np.ndarray, num_bytes: int, num_labels: int) -> np.ndarray:
    """Validate a JPEG offsets array (int, N + 1 entries, 0 .. num_bytes, non-decreasing)."""
    key = f"{split}_offsets"
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise DataError(f"{path}: {key} must be a 1-D integer array, found {offsets.dtype} {offsets.shape}")
    if offsets.shape[0] != num_labels + 1:
        raise DataError(
            f"{path}: {key} has {offsets.shape[0]} entries, expected {num_labels + 1} "
            f"(one more than the {num_labels} labels of y_{split})"
        )
    if offsets[0] != 0 or offsets[-1] != num_bytes:
        raise DataError(
            f"{path}: {key} must start at 0 and end at {num_bytes} (the length of {split}_jpeg), "
            f"found {int(offsets[0])}..{int(offsets[-1])}"
        )
    backwards = np.flatnonzero(np.diff(offsets) < 0)
    if backwards.size:
        raise DataError(f"{path}: {key} decreases at index {int(backwards[0])} (offsets must be non-decreasing)")
    return offsets.astype(np.int64)


def _open_jpeg(path: Path, split: str, i: int, buffer: memoryview, *, load: bool) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(buffer), formats=["JPEG"])
        if load:
            img.load()
    except Exception as e:  # untrusted bytes: Pillow raises many exception types
        raise DataError(f"{path}: {split} image {i} is not a valid JPEG ({one_line(e)})") from None
    return img


def jpeg_split_modes(path: Path, split: str, data: np.ndarray, offsets: np.ndarray) -> set[str]:
    """The Pillow modes (L, RGB, CMYK, ...) of a split's JPEGs, read from their headers only."""
    if data.ndim != 1 or data.dtype != np.uint8:
        raise DataError(f"{path}: {split}_jpeg must be 1-D uint8 bytes, found {data.dtype} {data.shape}")
    raw = memoryview(np.ascontiguousarray(data)).cast("B")
    bounds = offsets.tolist()
    return {_open_jpeg(path, split, i, raw[bounds[i]:bounds[i + 1]], load=False).mode
            for i in range(len(bounds) - 1)}


def decode_jpeg_split(path: Path, split: str, data: np.ndarray, offsets: np.ndarray, mode: str = "RGB"
                      ) -> np.ndarray:
    """Decode every JPEG of one split into uint8 (N, H, W, C) in ``mode`` (``L``: C = 1, ``RGB``: C = 3):
    an image in another mode (a grayscale JPEG among colour ones, CMYK) is converted with Pillow. All
    must share one size."""
    if data.ndim != 1 or data.dtype != np.uint8:
        raise DataError(f"{path}: {split}_jpeg must be 1-D uint8 bytes, found {data.dtype} {data.shape}")
    raw = memoryview(np.ascontiguousarray(data)).cast("B")
    bounds = offsets.tolist()
    out: np.ndarray | None = None
    for i in progress(range(len(bounds) - 1), desc=f"decoding {split} JPEGs", unit="img"):
        img = _open_jpeg(path, split, i, raw[bounds[i]:bounds[i + 1]], load=True)
        if img.mode != mode:
            img = img.convert(mode)
        if out is None:
            out = np.empty((len(bounds) - 1, img.height, img.width, 1 if mode == "L" else 3), np.uint8)
        elif img.size != (out.shape[2], out.shape[1]):
            raise DataError(
                f"{path}: {split} image {i} is {img.size[0]}x{img.size[1]}, but image 0 is "
                f"{out.shape[2]}x{out.shape[1]} (all images must have one size)"
            )
        out[i] = np.frombuffer(img.tobytes(), np.uint8).reshape(out.shape[1:])  # faster than asarray
    if out is None:
        raise DataError(f"{path}: the {split} split is empty")
    return out


def _class_names(path: Path, arrays: _NpzArrays, labels: list[np.ndarray]) -> list[str]:
    top = max(int(y.max()) for y in labels if y.size) if any(y.size for y in labels) else -1
    if CLASS_NAMES_KEY not in arrays.keys:
        return [str(k) for k in range(top + 1)]
    names = arrays[CLASS_NAMES_KEY]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{path}: class_names must be a 1-D string array, found {names.dtype} {names.shape}")
    try:
        out = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names.tolist()]
    except UnicodeDecodeError:
        raise DataError(f"{path}: class_names are not valid UTF-8") from None
    if top >= len(out):
        raise DataError(f"{path}: label {top} has no class name (class_names has {len(out)} entries)")
    return out


def _open_npz(path: Path, read):
    """``read(path, arrays)`` on an open npz file (every failure a one-line DataError)."""
    try:
        f = open(path, "rb")  # a missing path is refused earlier, by sources.locate_source
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:  # np.load is given the open file so that nothing leaks when it fails
        head = f.read(6)
        if head == NPY_MAGIC:
            raise DataError(f"{path}: is a single .npy array, not an .npz archive of named arrays")
        if head[:2] != ZIP_MAGIC:
            raise DataError(f"{path}: not an .npz file (no zip signature)")
        f.seek(0)
        try:
            npz = np.load(f, allow_pickle=False)
        except _LOAD_ERRORS as e:
            raise DataError(f"{path}: not a readable .npz file ({one_line(e)})") from None
        with npz:
            return read(path, _NpzArrays(path, npz))


def read_npz(path: str | os.PathLike) -> tuple[dict[str, SplitArrays], list[str]]:
    """Read an npz dataset (either layout) into {"train", "test"} splits and class names."""
    return _open_npz(Path(path).expanduser().resolve(), _read_splits)


def read_npz_encoded(path: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """An npz of JPEG bytes as JPEG-at-rest splits: {"train", "test"} ->
    :class:`onepoch.data.encoded.EncodedSource` (each image's bytes as stored), and class names."""
    return _open_npz(Path(path).expanduser().resolve(), _read_encoded)


def _read_encoded(path: Path, arrays: _NpzArrays) -> tuple[dict[str, Any], list[str]]:

    if detect_layout(path, arrays.keys) != "jpeg":
        raise DataError(f"{path}: holds image arrays, not JPEG bytes; prepare it with the raw layout")
    labels = {s: check_labels(path, f"y_{s}", arrays[f"y_{s}"]) for s in SPLITS}
    class_names = _class_names(path, arrays, list(labels.values()))
    splits = {}
    for split in SPLITS:
        data = arrays[f"{split}_jpeg"]
        if data.ndim != 1 or data.dtype != np.uint8:
            raise DataError(f"{path}: {split}_jpeg must be 1-D uint8 bytes, found {data.dtype} {data.shape}")
        bounds = check_offsets(path, split, arrays[f"{split}_offsets"], data.size, labels[split].shape[0]).tolist()

        def records(data=data, bounds=bounds, y=labels[split].tolist(), split=split):
            for i in range(len(y)):
                yield f"{path.name}: {split} image {i}", data[bounds[i]:bounds[i + 1]].tobytes(), y[i]

        splits[split] = EncodedSource(len(bounds) - 1, records)
    return splits, class_names


def _read_splits(path: Path, arrays: _NpzArrays) -> tuple[dict[str, SplitArrays], list[str]]:
    layout = detect_layout(path, arrays.keys)
    labels = {s: check_labels(path, f"y_{s}", arrays[f"y_{s}"]) for s in SPLITS}
    class_names = _class_names(path, arrays, list(labels.values()))
    splits = {}
    if layout == "jpeg":
        jpegs = {}
        for split in SPLITS:
            data = arrays[f"{split}_jpeg"]
            jpegs[split] = data, check_offsets(path, split, arrays[f"{split}_offsets"], data.size,
                                               labels[split].shape[0])
        # one mode for the dataset: grayscale only if every image is (ImageNet-like sets hold a few
        # grayscale and CMYK JPEGs among colour ones: those are converted, not refused)
        modes = set().union(*(jpeg_split_modes(path, split, *jpegs[split]) for split in SPLITS))
        mode = "L" if modes == {"L"} else "RGB"
    for split in SPLITS:
        if layout == "jpeg":
            images = decode_jpeg_split(path, split, *jpegs[split], mode=mode)
        else:
            images = arrays[f"x_{split}"]
        try:
            splits[split] = check_split(split, images, labels[split], len(class_names))
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
    return splits, class_names
