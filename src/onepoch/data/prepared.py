"""Prepared datasets: plain ``.npy`` arrays plus JSON metadata, written atomically.

Layout of a prepared dataset directory (small images: raw uint8 arrays)::

    OUT/dataset.json            name, splits, class names, source, the request that made it
    OUT/<split>/images.npy      uint8 (N, H, W, C)
    OUT/<split>/labels.npy      int64 (N,)
    OUT/<split>/meta.json       shape, class names, per-channel mean/std (0..1 scale), source,
                                sha256 of each array's raw C-order bytes

Large images keep their JPEG bytes instead (``"layout": "jpeg"`` in meta.json and dataset.json;
``onepoch.data.encoded``): ``<split>/encoded.bin``, ``offsets.npy``, ``sizes.npy``, ``labels.npy``.

The whole directory is written into a hidden staging directory beside OUT and renamed into place
only when complete, so an interrupted prepare never leaves something that looks like a dataset.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onepoch import __version__
from onepoch.atomic import publish_dir, staging_dir
from onepoch.data.checksum import array_sha256, check_stamp, file_stamp
from onepoch.data.encoded import (
    EncodedImages,
    EncodedSource,
    eval_size_default,
    verify_encoded_split,
    write_encoded_split,
)
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
    max_side: int | None = None  # encoded splits: longer side cap (larger images are encoded again)
    quality: int = 95  # encoded splits: JPEG quality of the images encoded again
    # splits whose labels mean nothing (e.g. STL-10's train+unlabeled, all 0): their meta.json says
    # "labelled": false; training on one leaves the online probe off (refuses it when asked for explicitly)
    unlabeled_splits: tuple[str, ...] = ()


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


STAMP_KEYS = ("files", "tree", "test_files", "test_tree")  # what a request records of the source files


def _without_stamps(request: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in request.items() if k not in STAMP_KEYS}


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
        old_request = info.get("request") if isinstance(info.get("request"), dict) else {}
        if info.get("name") == name and _without_stamps(old_request) == _without_stamps(request):
            raise DataError(f"--out {out} already holds another prepared dataset: the source files changed since it "
                            f"was prepared ({name}, {request.get('source')}); pass --force to replace it")
        raise DataError(
            f"--out {out} already holds another prepared dataset ({info.get('name')}, "
            f"{_without_stamps(old_request)}); pass --force to replace it"
        )
    if any(out.iterdir()):
        raise DataError(
            f"--out {out} exists and is not an onepoch prepared dataset; refusing to overwrite it "
            "(choose a new or empty directory)"
        )
    return False


def write_prepared(data: SourceData, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Validate ``data`` and write it as a prepared dataset at ``out``, atomically.

    Splits given as :class:`SplitArrays` are written as raw arrays; splits given as
    :class:`onepoch.data.encoded.EncodedSource` keep their JPEG bytes (every split of a dataset must
    be of one kind). An existing prepared dataset is only replaced with ``force``; any other existing
    non-empty directory is refused.
    """

    out = Path(out)
    num_classes = len(data.class_names)
    if num_classes == 0:
        raise DataError(f"{data.name}: no classes")
    encoded = [isinstance(a, EncodedSource) for a in data.splits.values()]
    if any(encoded) and not all(encoded):
        raise DataError(f"{data.name}: every split must be raw arrays or every split encoded images")
    if all(encoded):
        return _write_encoded(data, out, force=force)
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
            _write_json(d / "meta.json", {
                **_common_meta(data, split, created), "num_images": int(arrays.images.shape[0]),
                "shape": list(arrays.images.shape[1:]), "mean": mean, "std": std,
                "sha256": {"images": array_sha256(arrays.images), "labels": array_sha256(arrays.labels)},
                "stamps": {"images.npy": file_stamp(d / "images.npy")},
            })
        _write_dataset_json(tmp, data, list(splits), list(next(iter(shapes))), created)
        publish_dir(tmp, out)
    return out


def _common_meta(data: SourceData, split: str, created: str) -> dict[str, Any]:
    return {"format": FORMAT, "version": FORMAT_VERSION, "dataset": data.name, "split": split,
            "num_classes": len(data.class_names), "class_names": list(data.class_names), "source": data.source,
            **({"labelled": False} if split in data.unlabeled_splits else {}),
            "created": created, "onepoch_version": __version__}


def _write_dataset_json(tmp: Path, data: SourceData, splits: list[str], shape: list[int], created: str,
                        **extra: Any) -> None:
    # dataset.json last: its presence is what marks the directory as a complete dataset.
    _write_json(tmp / DATASET_FILE, {
        "format": FORMAT, "version": FORMAT_VERSION, "name": data.name, "splits": splits,
        "class_names": list(data.class_names), "shape": shape, **extra, "source": data.source,
        "request": data.request, "created": created, "onepoch_version": __version__,
    })


def _write_encoded(data: SourceData, out: Path, *, force: bool) -> Path:
    """write_prepared for JPEG-at-rest splits (streamed: memory stays bounded whatever the size)."""

    check_out_dir(out, data.name, data.request, force)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    eval_sizes = []
    with staging_dir(out) as tmp:
        for split, source in data.splits.items():
            d = tmp / split
            d.mkdir()
            measured = write_encoded_split(d, source, len(data.class_names), max_side=data.max_side,
                                           quality=data.quality, desc=f"{data.name} {split}")
            sizes = np.load(d / "sizes.npy")
            eval_size = eval_size_default(data.max_side, sizes)
            eval_sizes.append(eval_size)
            _write_json(d / "meta.json", {
                **_common_meta(data, split, created), "layout": "jpeg", **measured,
                "shape": [eval_size, eval_size, 3], "eval_size": eval_size,
                "max_side": data.max_side, "quality": data.quality,
                "min_size": [int(v) for v in sizes.min(0)], "max_size": [int(v) for v in sizes.max(0)],
                "bytes": int(np.load(d / "offsets.npy")[-1]),
            })
        size = min(eval_sizes)
        _write_dataset_json(tmp, data, list(data.splits), [size, size, 3], created, layout="jpeg")
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

    @property
    def encoded(self) -> bool:
        """True for a JPEG-at-rest split (``images`` is an EncodedImages)."""
        return self.meta.get("layout") == "jpeg"

    def subset(self, count: int) -> "PreparedSplit":
        """The first ``count`` images of this split (mean/std stay those of the whole split)."""
        images = self.images.subset(count) if self.encoded else self.images[:count]
        return PreparedSplit(self.root, self.split, images, self.labels[:count], self.meta)


def check_labels(path: Path, labels: np.ndarray, meta: dict[str, Any]) -> None:
    """Every label of a labelled split lies in [0, num_classes) (one pass over the labels: cheap)."""
    if meta.get("labelled") is False or not len(labels):
        return
    classes = int(meta.get("num_classes", len(meta.get("class_names", []))))
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise DataError(f"{path}: label {int(labels[bad[0]])} (image {int(bad[0])}) is outside the {classes} classes "
                        f"[0, {classes - 1}] (prepare it again)")


def open_split(
    root: str | os.PathLike, split: str = "train", *, mmap: bool = True, verify: bool = False,
    image_size: int | None = None,
) -> PreparedSplit:
    """Open ``root/split`` of a prepared dataset. ``verify`` re-hashes the files against meta.json.
    An encoded (JPEG-at-rest) split's ``images`` is an :class:`onepoch.data.encoded.EncodedImages`,
    read as uint8 batches at ``image_size`` (default: the split's ``eval_size``)."""
    root = Path(root)
    info = read_dataset_info(root)
    if split not in info.get("splits", []):
        raise DataError(f"{root} has no split {split!r} (it has: {', '.join(info.get('splits', []))})")
    d = root / split
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{d / 'meta.json'} is missing or unreadable: {e}") from None
    if meta.get("layout") == "jpeg":
        return _open_encoded(root, split, meta, verify=verify, image_size=image_size)
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
    check_labels(d / "labels.npy", labels, meta)
    if verify:
        stamps = meta.get("stamps", {})
        for key, arr in (("images", images), ("labels", labels)):
            if not isinstance(meta.get("sha256"), dict) or key not in meta["sha256"]:
                raise DataError(f"{d / 'meta.json'} records no sha256 of {key}.npy (prepare it again)")
            full = check_stamp(d / f"{key}.npy", stamps.get(f"{key}.npy"))
            if full and array_sha256(arr) != meta["sha256"][key]:
                raise DataError(
                    f"{d / (key + '.npy')}: checksum does not match meta.json "
                    "(the file changed after it was prepared; prepare it again)"
                )
    return PreparedSplit(root, split, images, labels, meta)


def _open_encoded(root: Path, split: str, meta: dict[str, Any], *, verify: bool, image_size: int | None
                  ) -> PreparedSplit:

    d = root / split
    if verify:
        verify_encoded_split(d, meta)
    images = EncodedImages.open(d, image_size or int(meta["eval_size"]))
    try:
        labels = np.load(d / "labels.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{d}: cannot read labels ({e})") from None
    if len(images) != int(meta["num_images"]) or labels.dtype != np.int64 or labels.shape != (len(images),):
        raise DataError(f"{d}: expected {meta['num_images']} images and int64 labels, found {len(images)} "
                        f"images and {labels.dtype} labels {labels.shape} (prepare it again)")
    check_labels(d / "labels.npy", labels, meta)
    return PreparedSplit(root, split, images, labels, meta)
