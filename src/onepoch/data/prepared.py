"""Prepared datasets: plain ``.npy`` arrays plus JSON metadata, written atomically.

Layout of a prepared dataset directory::

    OUT/dataset.json            name, splits, class names, source, the request that made it
    OUT/<split>/images.npy      uint8 (N, H, W, C)
    OUT/<split>/labels.npy      int64 (N,)
    OUT/<split>/meta.json       shape, class names, per-channel mean/std (0..1 scale), source,
                                sha256 of each array's raw C-order bytes

The whole directory is written into a hidden staging directory beside OUT and renamed into place
only when complete, so an interrupted prepare never leaves something that looks like a dataset.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onepoch import __version__
from onepoch.atomic import publish_dir, staging_dir
from onepoch.errors import DataError
from onepoch.progress import progress

FORMAT = "onepoch-prepared"
FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"


@dataclass
class SplitArrays:
    """One split of a dataset in memory: ``images`` uint8 (N, H, W, C), ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class SourceData:
    """What a source reader returns: named splits, class names and a description of the source."""

    name: str
    splits: dict[str, SplitArrays]
    class_names: list[str]
    source: str
    request: dict[str, Any] = field(default_factory=dict)


def check_split(split: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> SplitArrays:
    """Validate one split and return it in canonical form (NHWC uint8 images, int64 labels).

    NHW images get a channel axis. Raises :class:`DataError` naming the problem.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8:
        raise DataError(f"{split} images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{split} images must have shape (N, H, W) or (N, H, W, 1|3), got {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise DataError(f"{split} split is empty")
    if labels.ndim != 1:
        raise DataError(f"{split} labels must be 1-D, got shape {tuple(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{split} labels must be integers, got {labels.dtype}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{split}: {images.shape[0]} images but {labels.shape[0]} labels (counts must match)"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{split} labels must lie in [0, {num_classes - 1}], found {int(labels.min())}..{int(labels.max())}"
        )
    return SplitArrays(np.ascontiguousarray(images), labels.astype(np.int64, copy=False))


def array_sha256(a: np.ndarray, chunk_rows: int = 4096) -> str:
    """sha256 of an array's raw C-order bytes (chunked, so memmaps are not read into RAM at once)."""
    h = hashlib.sha256()
    for start in range(0, max(1, a.shape[0] if a.ndim else 1), chunk_rows):
        h.update(np.ascontiguousarray(a[start : start + chunk_rows] if a.ndim else a).tobytes())
    return h.hexdigest()


def channel_stats(images: np.ndarray, chunk_rows: int = 4096, on_chunk=None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, H, W, C), on the 0..1 scale."""
    c = images.shape[-1]
    s = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    for start in range(0, images.shape[0], chunk_rows):
        x = images[start : start + chunk_rows].reshape(-1, c).astype(np.float32)
        s += x.sum(0, dtype=np.float64)
        s2 += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        if on_chunk is not None:
            on_chunk(min(chunk_rows, images.shape[0] - start))
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    return [round(float(m) / 255, 6) for m in mean], [round(float(v) / 255, 6) for v in std]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def is_prepared(path: str | os.PathLike) -> bool:
    """True when ``path`` is a complete prepared dataset (its ``dataset.json`` names our format)."""
    try:
        info = json.loads((Path(path) / DATASET_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == FORMAT


def read_dataset_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``dataset.json`` of a prepared dataset; :class:`DataError` when ``path`` is not one."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"prepared dataset not found: {path} (create it with `onepoch prepare`)")
    if not is_prepared(path):
        raise DataError(f"{path} is not an onepoch prepared dataset (no valid {DATASET_FILE})")
    info = json.loads((path / DATASET_FILE).read_text(encoding="utf-8"))
    if info.get("version", 0) > FORMAT_VERSION:
        raise DataError(f"{path} was prepared by a newer onepoch (format version {info['version']})")
    return info


def check_out_dir(out: str | os.PathLike, name: str, request: dict[str, Any], force: bool) -> bool:
    """Decide what to do with an existing ``--out``. Returns True when it already holds exactly this
    dataset (nothing to do); raises :class:`DataError` when it must not be touched."""
    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if is_prepared(out):
        info = read_dataset_info(out)
        if force:
            return False
        if info.get("name") == name and info.get("request") == request:
            return True
        raise DataError(
            f"--out {out} already holds another prepared dataset ({info.get('name')}, "
            f"{info.get('request')}); pass --force to replace it"
        )
    if any(out.iterdir()):
        raise DataError(
            f"--out {out} exists and is not an onepoch prepared dataset; refusing to overwrite it "
            "(choose a new or empty directory)"
        )
    return False


def write_prepared(data: SourceData, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Validate ``data`` and write it as a prepared dataset at ``out``, atomically.

    An existing prepared dataset is only replaced with ``force``; any other existing non-empty
    directory is refused.
    """
    out = Path(out)
    num_classes = len(data.class_names)
    if num_classes == 0:
        raise DataError(f"{data.name}: no classes")
    splits = {s: check_split(s, a.images, a.labels, num_classes) for s, a in data.splits.items()}
    shapes = {tuple(a.images.shape[1:]) for a in splits.values()}
    if len(shapes) != 1:
        raise DataError(f"{data.name}: splits have different image shapes {sorted(shapes)}")
    check_out_dir(out, data.name, data.request, force)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with staging_dir(out) as tmp:
        for split, arrays in splits.items():
            d = tmp / split
            d.mkdir()
            np.save(d / "images.npy", arrays.images)
            np.save(d / "labels.npy", arrays.labels)
            with progress(total=arrays.images.shape[0], desc=f"statistics of {split}", unit="img") as bar:
                mean, std = channel_stats(arrays.images, on_chunk=bar.update)
            _write_json(
                d / "meta.json",
                {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "dataset": data.name,
                    "split": split,
                    "num_images": int(arrays.images.shape[0]),
                    "shape": list(arrays.images.shape[1:]),
                    "num_classes": num_classes,
                    "class_names": list(data.class_names),
                    "mean": mean,
                    "std": std,
                    "source": data.source,
                    "sha256": {
                        "images": array_sha256(arrays.images),
                        "labels": array_sha256(arrays.labels),
                    },
                    "created": created,
                    "onepoch_version": __version__,
                },
            )
        # dataset.json last: its presence is what marks the directory as a complete dataset.
        _write_json(
            tmp / DATASET_FILE,
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "name": data.name,
                "splits": list(splits),
                "class_names": list(data.class_names),
                "shape": list(next(iter(shapes))),
                "source": data.source,
                "request": data.request,
                "created": created,
                "onepoch_version": __version__,
            },
        )
        publish_dir(tmp, out)
    return out


@dataclass
class PreparedSplit:
    """One split of a prepared dataset, opened from disk (``images`` may be a read-only memmap)."""

    root: Path
    split: str
    images: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any]

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def mean(self) -> list[float]:
        return list(self.meta["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.meta["std"])

    def subset(self, count: int) -> "PreparedSplit":
        """The first ``count`` images of this split (mean/std stay those of the whole split)."""
        return PreparedSplit(self.root, self.split, self.images[:count], self.labels[:count], self.meta)


def open_split(
    root: str | os.PathLike, split: str = "train", *, mmap: bool = True, verify: bool = False
) -> PreparedSplit:
    """Open ``root/split`` of a prepared dataset. ``verify`` re-hashes the arrays against meta.json."""
    root = Path(root)
    info = read_dataset_info(root)
    if split not in info.get("splits", []):
        raise DataError(f"{root} has no split {split!r} (it has: {', '.join(info.get('splits', []))})")
    d = root / split
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{d / 'meta.json'} is missing or unreadable: {e}") from None
    try:
        images = np.load(d / "images.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        labels = np.load(d / "labels.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{d}: cannot read arrays ({e})") from None
    expected = (int(meta["num_images"]), *meta["shape"])
    if images.dtype != np.uint8 or tuple(images.shape) != expected:
        raise DataError(
            f"{d / 'images.npy'}: expected uint8 {expected}, found {images.dtype} {tuple(images.shape)}"
        )
    if labels.dtype != np.int64 or labels.shape != (expected[0],):
        raise DataError(f"{d / 'labels.npy'}: expected int64 ({expected[0]},), found {labels.dtype} {labels.shape}")
    if verify:
        for key, arr in (("images", images), ("labels", labels)):
            if array_sha256(arr) != meta["sha256"][key]:
                raise DataError(
                    f"{d / (key + '.npy')}: checksum does not match meta.json "
                    "(the file changed after it was prepared; prepare it again)"
                )
    return PreparedSplit(root, split, images, labels, meta)
