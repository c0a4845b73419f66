"""IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

An IDX file is a big-endian header -- a 4-byte magic ``00 00 <type> <ndims>`` followed by one
uint32 per dimension -- and then the raw values in C order. Only unsigned-byte files are read:
magic ``0x00000803`` for images (N, rows, cols) and ``0x00000801`` for labels (N,).
Compression is detected from the gzip magic bytes ``1f 8b``, not from the file name.

Also the facts of the two IDX datasets (``fashion-mnist``, ``mnist``): their file names, class names,
system copies, download mirrors and pinned sha256s (:mod:`onepoch.data.sources` finds and fetches them).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from onepoch.data.prepared import SplitArrays
from onepoch.errors import DataError, one_line

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
GZIP_MAGIC = b"\x1f\x8b"
MAX_PAYLOAD_BYTES = 1 << 34  # 16 GiB: anything larger is a corrupt header, not a dataset

_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError

# --- where the files are: names, system copies, mirrors, pinned hashes ---------------------------

# IDX file stems by (split, kind); each file may be stored plain or gzip-compressed ("<stem>.gz").
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

IDX_CLASS_NAMES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
}

# Where a distribution package puts the files (Debian: `apt-get install dataset-fashion-mnist`).
SYSTEM_DIRS: dict[str, Path] = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}
SYSTEM_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}

# Download locations, tried in order (HTTPS first; the official Fashion-MNIST host serves only HTTP,
# which the pinned sha256 makes safe); IDX files are fetched as <base URL><stem>.gz.
IDX_BASE_URLS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                      "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
}
# sha256 of every official file: a download (or a cached copy) with another hash is deleted, never used.
# The same values are published by TensorFlow Datasets / Keras and match the MD5s torchvision pins.
IDX_SHA256: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "mnist": {
        "train-images-idx3-ubyte": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
}


def find_idx_files(directory: Path) -> dict[tuple[str, str], Path | None]:
    """The IDX files present in ``directory`` (plain name preferred over ``.gz``), None if absent."""
    found: dict[tuple[str, str], Path | None] = {}
    for key, stem in IDX_FILES.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        found[key] = next((c for c in candidates if c.is_file()), None)
    return found


def is_gzip(path: str | os.PathLike) -> bool:
    """True when the file starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _open_stream(path: Path) -> BinaryIO:
    """The decompressed byte stream of ``path`` (gzip detected by its magic bytes)."""
    if is_gzip(path):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _read_into(stream: BinaryIO, out: memoryview) -> int:
    """Fill ``out`` from ``stream``; returns how many bytes were read (less at end of file)."""
    got = 0
    while got < len(out):
        n = stream.readinto(out[got:])
        if not n:
            break
        got += n
    return got


def _read_header(stream: BinaryIO, path: Path, magic: int, ndims: int, kind: str) -> tuple[int, ...]:
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(head)} bytes)")
    found = struct.unpack(">I", head)[0]
    if found != magic:
        raise DataError(
            f"{path}: not an IDX {kind} file (magic 0x{found:08x}, expected 0x{magic:08x})"
        )
    dims_raw = stream.read(4 * ndims)
    if len(dims_raw) < 4 * ndims:
        raise DataError(f"{path}: truncated IDX header (dimensions missing)")
    return struct.unpack(f">{ndims}I", dims_raw)


def read_idx(path: str | os.PathLike, *, magic: int, ndims: int, kind: str) -> np.ndarray:
    """Read an unsigned-byte IDX file with the given magic and rank into a uint8 array.

    The payload length must equal the product of the dimensions exactly (a truncated or
    over-long file is an error). Raises :class:`DataError` naming the file and the problem.
    """
    path = Path(path)
    try:
        with _open_stream(path) as stream:
            dims = _read_header(stream, path, magic, ndims, kind)
            payload = math.prod(dims)
            if payload > MAX_PAYLOAD_BYTES:
                raise DataError(f"{path}: implausible IDX dimensions {dims}")
            values = np.empty(dims, np.uint8)
            got = _read_into(stream, memoryview(values.reshape(-1)))
            if got < payload:
                raise DataError(
                    f"{path}: truncated IDX data ({got} of {payload} bytes for dimensions {dims})"
                )
            extra = len(stream.read(1 << 16))
            if extra:
                raise DataError(
                    f"{path}: IDX file is longer than its header says (dimensions {dims}, "
                    f"{payload} bytes, found more)"
                )
    except DataError:
        raise
    except PermissionError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the file's permissions") from None
    except _READ_ERRORS as e:
        raise DataError(f"{path}: cannot read ({one_line(e)}); the file is truncated or corrupt") from None
    return values


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Images of an IDX image file as uint8 (N, rows, cols, 1)."""
    images = read_idx(path, magic=IMAGES_MAGIC, ndims=3, kind="images")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"{path}: images have an empty dimension {images.shape}")
    return images[..., None]


def read_idx_labels(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """Labels of an IDX label file as int64 (N,), each checked to lie in [0, num_classes)."""
    labels = read_idx(path, magic=LABELS_MAGIC, ndims=1, kind="labels")
    if labels.size and int(labels.max()) >= num_classes:
        raise DataError(
            f"{path}: label {int(labels.max())} is out of range (expected 0..{num_classes - 1})"
        )
    return labels.astype(np.int64)


def read_idx_split(images_path: str | os.PathLike, labels_path: str | os.PathLike,
                   num_classes: int) -> SplitArrays:
    """One split from a pair of IDX files; the image and label counts must match."""
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path, num_classes)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels (counts must match)"
        )
    return SplitArrays(images, labels)
