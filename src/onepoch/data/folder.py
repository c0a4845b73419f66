"""Image folders: ``ROOT/<class name>/<image>.{png,jpg,jpeg}``, decoded to square uint8 arrays.

Rules for a folder source:

- every non-hidden entry of ROOT is a class directory (at least two); sorted directory names are
  the class names and a class's label is its index in that order;
- every non-hidden entry of a class directory is a PNG or JPEG file (extension checked
  case-insensitively); anything else -- another file type, a nested directory, a file Pillow
  cannot decode -- is an error naming it; names starting with '.' are ignored everywhere;
- each image is converted to RGB (or "L" with ``grayscale``), resized with Pillow's antialiased
  bicubic filter so that its shorter side is ``size``, then center-cropped to ``size`` x ``size``.

An unlabelled folder (``onepoch prepare folder --unlabelled``, :func:`list_unlabelled_folder`) is any tree of
images, no class folders needed: every PNG/JPEG at any depth (the same rules for other files and names starting
with '.'), in one split, ``train``, whose meta.json says ``"labelled": false``.

With the JPEG-at-rest layout (:func:`read_image_folder_encoded`, ``onepoch prepare folder --layout
jpeg``) the images are not decoded here: each split is an
:class:`onepoch.data.encoded.EncodedSource` of the files, kept byte for byte or re-encoded as the
writer decides (see :mod:`onepoch.data.encoded`). The ImageNet-style sources reuse the listing.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from onepoch.data.encoded import EncodedSource
from onepoch.data.prepared import SplitArrays
from onepoch.errors import DataError, one_line
from onepoch.progress import progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class FolderListing:
    """The images found under a folder source, in label-then-file-name order."""

    root: Path
    class_names: list[str]
    paths: list[Path]
    labels: np.ndarray  # int64, one per path


def _visible_entries(directory: Path) -> list[os.DirEntry]:
    """Entries of ``directory`` whose names do not start with '.', sorted by name."""
    try:
        with os.scandir(directory) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{directory}: cannot list directory ({e.strerror or e})") from None


def readable_name(name: str) -> str:
    """A file name as valid UTF-8 text: a name the file system holds as bytes that are not UTF-8 (Python
    decodes them to lone surrogates, which JSON, plots and terminals refuse) has each such byte written
    as ``\\xNN`` (``b'caf\\xe9'`` -> ``'caf\\\\xe9'``). Valid names are returned unchanged."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def not_an_image(path: Path) -> DataError:
    """The error for a file of an image folder that is not a PNG/JPEG file (by its extension)."""
    return DataError(f"{path}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")


def list_unlabelled_folder(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root`` at any depth (an unlabelled folder: no class folders needed; class
    folders, if any, are just subfolders), in path order. Names starting with '.' are ignored; any other
    file that is not a PNG/JPEG file is an error naming it, as in a labelled folder."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    found: list[Path] = []

    def walk(directory: Path) -> None:
        for e in _visible_entries(directory):
            path = directory / e.name
            if e.is_dir():
                walk(path)
            elif not e.name.lower().endswith(IMAGE_EXTENSIONS):
                raise not_an_image(path)
            else:
                found.append(path)

    walk(root)
    if not found:
        raise DataError(f"image folder {root} contains no images ({', '.join(IMAGE_EXTENSIONS)}) at any depth")
    return found


def list_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> FolderListing:
    """List the class directories and image files of ``root`` (see the module docstring).

    ``classes`` keeps only those class directories (each must exist; labels follow their sorted
    order, the others are not listed at all).

    Raises :class:`DataError` for a missing or empty root, a single class, a loose file in the root,
    a class directory without images, or an entry that is not a PNG/JPEG file.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    entries = _visible_entries(root)
    if not entries:
        raise DataError(f"image folder {root} is empty (expected one subfolder per class)")
    loose = [e.name for e in entries if not e.is_dir()]
    if loose:
        raise DataError(
            f"{root / loose[0]}: file in the root of an image folder; images must be in one "
            f"subfolder per class ({len(loose)} loose file(s))"
        )
    if classes is not None:
        wanted = set(classes)
        missing = sorted(wanted - {readable_name(e.name) for e in entries})
        if missing:
            raise DataError(f"{root}: no class folder for {len(missing)} of the {len(wanted)} requested "
                            f"class(es): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        entries = [e for e in entries if readable_name(e.name) in wanted]
    class_names, paths, labels = [], [], []
    readable = [readable_name(e.name) for e in entries]
    if len(set(readable)) < len(readable):
        clash = next(n for n in readable if readable.count(n) > 1)
        raise DataError(f"{root}: two class folders are both named {clash!r} once their bytes that are not "
                        "UTF-8 are written as \\xNN; rename one of them")
    for label, class_dir in enumerate(entries):
        class_path = root / class_dir.name
        images = []
        for e in _visible_entries(class_path):
            if e.is_dir():
                raise DataError(f"{class_path / e.name}: unexpected directory inside a class folder")
            if not e.name.lower().endswith(IMAGE_EXTENSIONS):
                raise not_an_image(class_path / e.name)
            images.append(class_path / e.name)
        if not images:
            raise DataError(f"{class_path}: class folder contains no images")
        class_names.append(readable[label])
        paths.extend(images)
        labels.extend([label] * len(images))
    if len(class_names) < 2:
        raise DataError(
            f"image folder {root} has a single class folder ({class_names[0]!r}); a dataset needs at least "
            "two classes (one subfolder per class)"
        )
    return FolderListing(root, class_names, paths, np.asarray(labels, np.int64))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of indices into (train, test), each in ascending order.

    A class with n >= 2 items puts ``round_half_up(n * test_fraction)`` of them in test, clamped
    to 1..n-1 (so every such class has at least one train and one test item); a class with a
    single item puts it in train. Which items go to test is drawn with
    ``numpy.random.default_rng(seed)``, class by class in label order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n = members.size
        if n < 2:
            continue
        n_test = min(n - 1, max(1, math.floor(n * test_fraction + 0.5)))
        test_parts.append(rng.permutation(members)[:n_test])
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(labels.size), test)
    return train, test


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is ``size`` (rounded, at least ``size``)."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def load_square_image(path: Path, size: int, grayscale: bool = False) -> np.ndarray:
    """Decode one PNG/JPEG as uint8 (size, size, C), C = 1 with ``grayscale`` else 3: turned
    upright by its EXIF orientation, shorter side resized to ``size`` (antialiased bicubic),
    then center-cropped."""
    mode = "L" if grayscale else "RGB"
    try:
        with Image.open(path) as img:
            transposed = img.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSED_ORIENTATIONS
            width, height = (img.height, img.width) if transposed else (img.width, img.height)
            new_w, new_h = _resized_size(width, height, size)
            # JPEG only: decode at a reduced scale that is still >= the target
            img.draft(mode, (new_h, new_w) if transposed else (new_w, new_h))
            img = ImageOps.exif_transpose(img).convert(mode)
            if img.size != (new_w, new_h):
                img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            pixels = np.asarray(img, np.uint8)
    except Exception as e:  # untrusted file: Pillow raises many exception types
        raise DataError(f"{path}: cannot decode image ({one_line(e)})") from None
    return pixels[..., None] if grayscale else pixels


def decode_images(paths: list[Path], size: int, grayscale: bool, desc: str) -> np.ndarray:
    """Decode ``paths`` into one uint8 (N, size, size, C) array, with a progress bar."""
    out = np.empty((len(paths), size, size, 1 if grayscale else 3), np.uint8)
    for i, path in enumerate(progress(paths, desc=desc, unit="img")):
        out[i] = load_square_image(path, size, grayscale)
    return out


def _check_same_classes(train: FolderListing, test: FolderListing) -> None:
    if train.class_names != test.class_names:
        only_train = sorted(set(train.class_names) - set(test.class_names))
        only_test = sorted(set(test.class_names) - set(train.class_names))
        raise DataError(
            f"test folder {test.root} has different class folders than {train.root} "
            f"(only in train: {only_train[:5] or '-'}; only in test: {only_test[:5] or '-'})"
        )


def check_size(size: int | None) -> None:
    """A folder's ``--size``: required, a positive integer."""
    if size is None:
        raise DataError("an image folder source needs a target image size (--size N)")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"image size must be a positive integer, got {size!r}")


def read_image_folder(root: str | os.PathLike, *, size: int | None, grayscale: bool = False,
                      test_source: str | os.PathLike | None = None,
                      test_fraction: float | None = None,
                      seed: int = 0) -> tuple[dict[str, SplitArrays], list[str]]:
    """Read an image folder into {"train", "test"} splits and class names.

    The test split is ``test_source`` (a second folder with the same class folders) or else a
    :func:`stratified_split` of ``root`` with ``test_fraction`` (default 0.2) and ``seed``.
    ``size`` is required.
    """
    check_size(size)
    (train_paths, train_labels), (test_paths, test_labels), class_names = split_image_folder(
        root, test_source=test_source, test_fraction=test_fraction, seed=seed)
    channels = "grayscale" if grayscale else "RGB"
    splits = {
        "train": SplitArrays(decode_images(train_paths, size, grayscale, f"decoding train images ({channels})"),
                             train_labels),
        "test": SplitArrays(decode_images(test_paths, size, grayscale, f"decoding test images ({channels})"),
                            test_labels),
    }
    return splits, class_names


def split_image_folder(root: str | os.PathLike, *, test_source: str | os.PathLike | None = None,
                       test_fraction: float | None = None, seed: int = 0
                       ) -> tuple[tuple[list[Path], np.ndarray], tuple[list[Path], np.ndarray], list[str]]:
    """The ``(paths, labels)`` of the train and the test split of an image folder, and its class
    names (see :func:`read_image_folder` for how the test split is chosen); nothing is decoded."""
    if test_source is not None and test_fraction is not None:
        raise DataError("give either a test folder or a test fraction, not both")
    listing = list_image_folder(root)
    if test_source is not None:
        test_listing = list_image_folder(test_source)
        _check_same_classes(listing, test_listing)
        train_paths, train_labels = listing.paths, listing.labels
        test_paths, test_labels = test_listing.paths, test_listing.labels
    else:
        fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
        train_idx, test_idx = stratified_split(listing.labels, fraction, seed)
        if test_idx.size == 0:
            raise DataError(
                f"{listing.root}: too few images for a test split (every class has only one image)"
            )
        train_paths = [listing.paths[i] for i in train_idx]
        test_paths = [listing.paths[i] for i in test_idx]
        train_labels, test_labels = listing.labels[train_idx], listing.labels[test_idx]
    return (train_paths, train_labels), (test_paths, test_labels), listing.class_names


# --- JPEG at rest ----------------------------------------------------------------------------------


def encoded_files(paths: Sequence[Path], labels: np.ndarray) -> EncodedSource:
    """Image files and their labels as an :class:`onepoch.data.encoded.EncodedSource` (each record
    names its file, so a file that does not decode is reported by path)."""
    paths, labels = list(paths), np.asarray(labels, np.int64)
    if len(paths) != len(labels):
        raise ValueError("one label per path")

    def records():
        for path, label in zip(paths, labels):
            yield str(path), path, int(label)

    return EncodedSource(len(paths), records)


def read_image_folder_encoded(root: str | os.PathLike, *, test_source: str | os.PathLike | None = None,
                              test_fraction: float | None = None, seed: int = 0
                              ) -> tuple[dict[str, EncodedSource], list[str]]:
    """An image folder as JPEG-at-rest splits {"train", "test"} (chosen as in :func:`read_image_folder`)
    and its class names; the images are read and checked when the splits are written."""
    (train_paths, train_labels), (test_paths, test_labels), class_names = split_image_folder(
        root, test_source=test_source, test_fraction=test_fraction, seed=seed)
    return {"train": encoded_files(train_paths, train_labels),
            "test": encoded_files(test_paths, test_labels)}, class_names


def tree_stamp(base: Path, roots: Sequence[Path]) -> dict[str, object]:
    """A cheap fingerprint of image folders for an idempotent prepare: the modification times of each
    of ``roots`` and of its visible subdirectories (one level down), named relative to ``base``, hashed.
    Adding, removing or renaming an image changes its directory's modification time; nothing is read
    and nothing below that level is listed (an image rewritten in place keeps the stamp)."""
    digest = hashlib.sha256()
    dirs = 0
    for root in roots:
        for d in [root, *(root / e.name for e in _visible_entries(root) if e.is_dir())]:
            digest.update(os.fsencode(f"{d.relative_to(base).as_posix()}\t{d.stat().st_mtime_ns}\n"))
            dirs += 1
    return {"dirs": dirs, "sha256": digest.hexdigest()}


def files_stamp(roots: Sequence[Path]) -> dict[str, object]:
    """A fingerprint of image folders that notices any image added, removed, renamed or rewritten: the
    name, size and modification time of every visible file one level below each of ``roots`` (the class
    folders), hashed. One ``stat`` per file and nothing read: for the raw layout, whose images are all
    decoded anyway, this is a small fraction of a prepare."""
    digest = hashlib.sha256()
    files = 0
    for root in roots:
        for class_dir in _visible_entries(root):
            if not class_dir.is_dir():
                continue
            for e in _visible_entries(root / class_dir.name):
                st = e.stat()
                digest.update(os.fsencode(f"{class_dir.name}/{e.name}\t{st.st_size}\t{st.st_mtime_ns}\n"))
                files += 1
    return {"files": files, "sha256": digest.hexdigest()}


# --- unlabelled folders ----------------------------------------------------------------------------

UNLABELLED_SPLIT = "train"  # the one split of an unlabelled folder, marked "labelled": false
UNLABELLED_CLASS_NAMES = ["unlabelled"]  # one placeholder class: every label is 0 and means nothing


def read_unlabelled_folder(paths: Sequence[Path], *, size: int | None, grayscale: bool = False
                           ) -> dict[str, SplitArrays]:
    """The images of :func:`list_unlabelled_folder` as one split decoded as in :func:`read_image_folder`
    (any mix of sizes becomes ``size`` x ``size``), labels all 0."""
    check_size(size)
    images = decode_images(list(paths), size, grayscale, f"decoding images ({'grayscale' if grayscale else 'RGB'})")
    return {UNLABELLED_SPLIT: SplitArrays(images, np.zeros(len(paths), np.int64))}


def listing_stamp(root: Path, paths: Sequence[Path]) -> dict[str, object]:
    """A fingerprint of the listed image files (name relative to ``root``, size and modification time of
    each, hashed) that notices any image added, removed, renamed or rewritten at any depth."""
    digest = hashlib.sha256()
    for path in paths:
        st = path.stat()
        digest.update(os.fsencode(f"{path.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n"))
    return {"files": len(paths), "sha256": digest.hexdigest()}
