"""Tiny ImageNet (CS231n's ``tiny-imagenet-200``): 200 classes of 64x64 images, stored raw.

Layout read, from the extracted folder or straight from ``tiny-imagenet-200.zip``::

    wnids.txt                          the 200 class wnids
    words.txt                          wnid <TAB> names (optional: class names; else the wnids)
    train/<wnid>/images/*.JPEG         500 training images per class (train/<wnid>/*_boxes.txt ignored)
    val/images/*.JPEG                  10,000 validation images ...
    val/val_annotations.txt            ... labelled here: file <TAB> wnid <TAB> box

``train`` becomes the ``train`` split and ``val`` the ``test`` split (``test/`` has no labels and is
not read). Labels follow the sorted wnids; class names are the first of each wnid's names in
words.txt (a name two classes share gets its wnid appended). Every image is decoded to uint8 RGB
(grayscale, palette and CMYK images converted; EXIF orientation applied) and must be 64x64.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from onepoch.data.download import Archive
from onepoch.data.folder import IMAGE_EXTENSIONS
from onepoch.data.imagenet import requested_classes
from onepoch.data.prepared import SplitArrays
from onepoch.errors import DataError, one_line
from onepoch.progress import progress

FOLDER = "tiny-imagenet-200"
ARCHIVE = "tiny-imagenet-200.zip"
# CS231n serves it over plain HTTP only; the pinned MD5 (torchvision's) is what makes that usable.
DOWNLOAD = Archive(ARCHIVE, "http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de")
SIZE = 64


class TinyFiles:
    """The files of a Tiny ImageNet copy, a folder or a zip archive, by path relative to the dataset
    folder (``train/n01443537/images/n01443537_0.JPEG``)."""

    def __init__(self, path: Path):
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
                names = self.zip.namelist()
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise DataError(f"{path}: not a readable zip archive ({one_line(e)})") from None
            tops = sorted({n[: -len("wnids.txt")] for n in names if n == "wnids.txt" or n.endswith("/wnids.txt")})
            if len(tops) != 1:
                raise DataError(f"{path}: expected one {FOLDER}/wnids.txt in the archive, found {len(tops)}")
            self.prefix = tops[0]
            self.names = [n[len(self.prefix):] for n in names if n.startswith(self.prefix) and not n.endswith("/")]
        else:
            self.prefix = ""
            self.names = []
            for sub in ("train", "val"):
                for dirpath, dirnames, filenames in os.walk(path / sub):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    rel = Path(dirpath).relative_to(path).as_posix()
                    self.names.extend(f"{rel}/{f}" for f in sorted(filenames))
            self.names.extend(n for n in ("wnids.txt", "words.txt") if (path / n).is_file())
        self.present = set(self.names)

    def where(self, rel: str) -> str:
        return f"{self.path}:{self.prefix}{rel}" if self.zip is not None else str(self.path / rel)

    def read(self, rel: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(self.prefix + rel)
            return (self.path / rel).read_bytes()
        except (OSError, EOFError, KeyError, zipfile.BadZipFile, RuntimeError) as e:
            raise DataError(f"{self.where(rel)}: cannot read ({one_line(e)})") from None

    def text(self, rel: str) -> str:
        try:
            return self.read(rel).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.where(rel)}: not UTF-8 text ({e.reason})") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def resolve_tiny_imagenet(source: str | os.PathLike) -> Path:
    """The ``tiny-imagenet-200`` folder or zip archive for ``source``: either itself, or a directory
    holding one of them."""
    path = Path(source).expanduser().resolve()
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"tiny-imagenet source {path} does not exist")
    if (path / "wnids.txt").is_file() or ((path / "train").is_dir() and (path / "val").is_dir()):
        return path
    for candidate in (path / FOLDER, path / ARCHIVE):
        if (candidate / "wnids.txt").is_file() or candidate.is_file():
            return candidate
    raise DataError(f"{path}: holds neither {ARCHIVE} nor a {FOLDER}/ folder (with wnids.txt, train/, val/)")


def decode_rgb(data: bytes, where: str, size: int = SIZE) -> np.ndarray:
    """One image as uint8 RGB (size, size, 3): upright, converted to RGB; another size is an error."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
            pixels = np.asarray(img.convert("RGB"), np.uint8)
    except Exception as e:  # untrusted file: Pillow raises many exception types
        raise DataError(f"{where}: cannot decode image ({one_line(e)})") from None
    if pixels.shape != (size, size, 3):
        raise DataError(f"{where}: image is {pixels.shape[1]}x{pixels.shape[0]}, Tiny ImageNet images are "
                        f"{size}x{size}")
    return pixels


def _wnids(files: TinyFiles) -> list[str]:
    if "wnids.txt" not in files.present:
        raise DataError(f"{files.where('wnids.txt')}: missing (the list of the 200 class wnids)")
    wnids = [w.strip() for w in files.text("wnids.txt").splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{files.where('wnids.txt')}: expected distinct wnids, one per line")
    return sorted(wnids)


def _class_names(files: TinyFiles, wnids: Sequence[str]) -> list[str]:
    words: dict[str, str] = {}
    wanted = set(wnids)
    if "words.txt" in files.present:
        for line in files.text("words.txt").splitlines():
            wnid, _, names = line.partition("\t")
            if wnid in wanted and names.strip():
                words[wnid] = names.split(",")[0].strip()
    names = [words.get(w, w) for w in wnids]
    return [f"{n} ({w})" if n != w and names.count(n) > 1 else n for n, w in zip(names, wnids)]


def _val_labels(files: TinyFiles, label_of: dict[str, int], all_wnids: set[str]) -> tuple[list[str], list[int]]:
    rel = "val/val_annotations.txt"
    if rel not in files.present:
        raise DataError(f"{files.where(rel)}: missing (the labels of the validation images)")
    images = {n for n in files.names if n.startswith("val/images/") and not n.rsplit("/", 1)[1].startswith(".")}
    names, labels, seen = [], [], set()
    for number, line in enumerate(files.text(rel).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or fields[1].strip() not in all_wnids:
            raise DataError(f"{files.where(rel)}:{number}: expected <file> TAB <wnid of wnids.txt> ..., got {line!r}")
        image, wnid = f"val/images/{fields[0].strip()}", fields[1].strip()
        if image in seen:
            raise DataError(f"{files.where(rel)}:{number}: {fields[0].strip()} is labelled twice")
        if image not in images:
            raise DataError(f"{files.where(rel)}:{number}: {files.where(image)} does not exist")
        seen.add(image)
        if wnid in label_of:
            names.append(image)
            labels.append(label_of[wnid])
    unlabelled = sorted(images - seen)
    if unlabelled:
        raise DataError(f"{files.where(unlabelled[0])}: has no label in {files.where(rel)}")
    return names, labels


def _decode_all(files: TinyFiles, names: list[str], desc: str) -> np.ndarray:
    out = np.empty((len(names), SIZE, SIZE, 3), np.uint8)
    for i, rel in enumerate(progress(names, desc=desc, unit="img")):
        out[i] = decode_rgb(files.read(rel), files.where(rel))
    return out


def read_tiny_imagenet(path: Path, classes: Sequence[str] | None = None
                       ) -> tuple[dict[str, SplitArrays], list[str], list[str]]:
    """Read a Tiny ImageNet folder or zip into {"train", "test"} raw splits; returns the splits, the
    class names and the wnids (both in label order). ``classes`` keeps a subset of the wnids."""
    files = TinyFiles(path)
    try:
        all_wnids = _wnids(files)
        wnids = all_wnids
        if classes is not None:
            wnids = requested_classes(classes, all_wnids, f"{files.where('wnids.txt')}: does not list")
        label_of = {w: i for i, w in enumerate(wnids)}
        train_names, train_labels = [], []
        per_class: dict[str, list[str]] = {w: [] for w in all_wnids}
        for n in files.names:
            parts = n.split("/")
            if parts[0] != "train" or any(p.startswith(".") for p in parts):
                continue
            if len(parts) == 4 and parts[2] == "images":
                if parts[1] not in per_class:
                    raise DataError(f"{files.where(n)}: class {parts[1]} is not in wnids.txt")
                if not parts[3].lower().endswith(IMAGE_EXTENSIONS):
                    raise DataError(f"{files.where(n)}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
                per_class[parts[1]].append(n)
        for w in wnids:
            if not per_class[w]:
                raise DataError(f"{files.where('train/' + w + '/images')}: no training images of class {w}")
            train_names.extend(sorted(per_class[w]))
            train_labels.extend([label_of[w]] * len(per_class[w]))
        val_names, val_labels = _val_labels(files, label_of, set(all_wnids))
        if not val_names:
            raise DataError(f"{files.where('val/val_annotations.txt')}: no validation image of the selected classes")
        splits = {
            "train": SplitArrays(_decode_all(files, train_names, "decoding train images"),
                                 np.asarray(train_labels, np.int64)),
            "test": SplitArrays(_decode_all(files, val_names, "decoding val images"), np.asarray(val_labels, np.int64)),
        }
        return splits, _class_names(files, wnids), wnids
    finally:
        files.close()


def stamp_dirs(path: Path) -> list[Path]:
    """The folders whose modification times fingerprint an extracted copy (see folder.tree_stamp)."""
    train = path / "train"
    dirs = [path, train, path / "val", path / "val" / "images"]
    if train.is_dir():
        dirs += [train / e / "images" for e in sorted(os.listdir(train))
                 if not e.startswith(".") and (train / e / "images").is_dir()]
    return [d for d in dirs if d.is_dir()]
