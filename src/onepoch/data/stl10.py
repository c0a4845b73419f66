"""STL-10 from the official binary release (``stl10_binary.tar.gz`` or its ``stl10_binary/`` folder).

Files: ``train_X.bin`` / ``train_y.bin`` (5,000 labelled images), ``test_X.bin`` / ``test_y.bin``
(8,000), ``unlabeled_X.bin`` (100,000 without labels) and ``class_names.txt``. Each image is
3 x 96 x 96 uint8, one channel plane after the other, each plane stored column by column (byte
``c * 9216 + x * 96 + y`` is channel c of the pixel in row y, column x); labels are bytes 1..10.
The archive is read member by member, nothing is extracted.

Splits written (raw uint8 96x96x3):

- ``train`` (5,000) and ``test`` (8,000), with their labels (0..9);
- ``train+unlabeled`` (105,000): the train images followed by the unlabeled ones, STL-10's usual
  pre-training set (torchvision's ``split="train+unlabeled"``). A prepared split must have a label in
  [0, 9] for every image, so all of them are 0 here: these labels mean nothing, and its meta.json says
  ``"labelled": false`` (:data:`UNLABELED_SPLITS`; training on it with the online probe on is refused).
  Pre-train on it with ``data.train_split=train+unlabeled train.online_probe=false`` and evaluate with
  ``data.train_split=train`` (the probes need real labels).

The whole ``train+unlabeled`` split is built in memory (about 2.9 GB) before it is written.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from onepoch.data.download import Archive
from onepoch.data.prepared import SplitArrays
from onepoch.errors import DataError, one_line
from onepoch.progress import progress

FOLDER = "stl10_binary"
ARCHIVE = "stl10_binary.tar.gz"
# Stanford serves it over plain HTTP only; the pinned MD5 (torchvision's) is what makes that usable.
DOWNLOAD = Archive(ARCHIVE, "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                   "91f7769df0f17e558f3565bffb0c7dfb")
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin")
CLASS_NAMES_FILE = "class_names.txt"
CLASS_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
UNLABELED_SPLIT = "train+unlabeled"
UNLABELED_SPLITS = (UNLABELED_SPLIT,)  # SourceData.unlabeled_splits: written as "labelled": false
_CHUNK_IMAGES = 1024


def images_from_bytes(raw: np.ndarray) -> np.ndarray:
    """STL-10 image bytes (n * 27648, planes stored column-major) as uint8 (n, 96, 96, 3)."""
    return raw.reshape(-1, 3, SIDE, SIDE).transpose(0, 3, 2, 1)  # (n, c, x, y) -> (n, y, x, c)


def resolve_stl10(source: str | os.PathLike) -> Path:
    """The archive or the folder holding the .bin files for ``source``: either itself, or a directory
    holding ``stl10_binary/`` or ``stl10_binary.tar.gz``."""
    path = Path(source).expanduser().resolve()
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"stl10 source {path} does not exist")
    if (path / FILES[0]).is_file() or path.name == FOLDER:
        return path
    for candidate in (path / FOLDER, path / ARCHIVE):
        if candidate.exists():
            return candidate
    raise DataError(f"{path}: holds neither {ARCHIVE} nor a {FOLDER}/ folder nor the STL-10 files "
                    f"({', '.join(FILES)})")


def _read_exactly(f: BinaryIO, out: memoryview, where: str) -> None:
    got = 0
    while got < len(out):
        n = f.readinto(out[got:])
        if not n:
            raise DataError(f"{where}: ended after {got:,} of {len(out):,} bytes (truncated)")
        got += n


def _fill_images(f: BinaryIO, out: np.ndarray, where: str, bar) -> None:
    """Read ``len(out)`` images from ``f`` into ``out`` (n, 96, 96, 3), a chunk at a time."""
    buffer = np.empty(_CHUNK_IMAGES * IMAGE_BYTES, np.uint8)
    for start in range(0, len(out), _CHUNK_IMAGES):
        n = min(_CHUNK_IMAGES, len(out) - start)
        _read_exactly(f, memoryview(buffer)[: n * IMAGE_BYTES], where)
        out[start:start + n] = images_from_bytes(buffer[: n * IMAGE_BYTES])
        bar.update(n)


class _Members:
    """The STL-10 files of a folder or a tar archive: sizes, and a reader for each."""

    def __init__(self, path: Path):
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.sizes: dict[str, int] = {}
        if path.is_file():
            self.tar = tarfile.open(path, "r:*")
            self.members = {}
            for m in self.tar.getmembers():
                base = m.name.rstrip("/").rsplit("/", 1)[-1]
                if m.isfile() and (base in FILES or base == CLASS_NAMES_FILE) and base not in self.members:
                    self.members[base] = m
                    self.sizes[base] = m.size
        else:
            for name in (*FILES, CLASS_NAMES_FILE):
                if (path / name).is_file():
                    self.sizes[name] = (path / name).stat().st_size

    def where(self, name: str) -> str:
        return f"{self.path}:{self.members[name].name}" if self.tar is not None else str(self.path / name)

    def open(self, name: str) -> BinaryIO:
        if self.tar is not None:
            f = self.tar.extractfile(self.members[name])
            assert f is not None  # regular files always have one
            return f
        return open(self.path / name, "rb")

    def in_order(self, names: list[str]) -> list[str]:
        """``names`` in the order they can be read fastest (archive order: no seeking back)."""
        if self.tar is None:
            return names
        return sorted(names, key=lambda n: self.members[n].offset)

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _count(members: _Members, name: str) -> int:
    size = members.sizes[name]
    if size == 0 or size % IMAGE_BYTES:
        raise DataError(f"{members.where(name)}: {size:,} bytes is not a whole number of {SIDE}x{SIDE}x3 images")
    return size // IMAGE_BYTES


def read_stl10(path: Path) -> tuple[dict[str, SplitArrays], list[str]]:
    """Read STL-10 (archive or folder, see :func:`resolve_stl10`) into the splits ``train``, ``test``
    and ``train+unlabeled`` (see the module docstring) and its class names."""
    try:
        members = _Members(path)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({one_line(e)}); the archive is truncated or corrupt") from None
    try:
        return _read(members)
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({one_line(e)}); the file is truncated or corrupt") from None
    finally:
        members.close()


def _read(members: _Members) -> tuple[dict[str, SplitArrays], list[str]]:
    missing = [n for n in FILES if n not in members.sizes]
    if missing:
        raise DataError(f"{members.path}: missing STL-10 file(s) {', '.join(missing)}")
    n_train, n_test, n_unlabeled = (_count(members, f"{s}_X.bin") for s in ("train", "test", "unlabeled"))
    for split, n in (("train", n_train), ("test", n_test)):
        if members.sizes[f"{split}_y.bin"] != n:
            raise DataError(f"{members.where(f'{split}_y.bin')}: {members.sizes[f'{split}_y.bin']:,} labels for "
                            f"{n:,} images in {split}_X.bin")
    class_names = CLASS_NAMES
    pretrain = np.empty((n_train + n_unlabeled, SIDE, SIDE, 3), np.uint8)
    test = np.empty((n_test, SIDE, SIDE, 3), np.uint8)
    targets = {"train_X.bin": pretrain[:n_train], "test_X.bin": test, "unlabeled_X.bin": pretrain[n_train:]}
    labels: dict[str, np.ndarray] = {}
    with progress(total=len(pretrain) + n_test, desc="reading STL-10", unit="img") as bar:
        for name in members.in_order([*FILES, *([CLASS_NAMES_FILE] if CLASS_NAMES_FILE in members.sizes else [])]):
            with members.open(name) as f:
                if name in targets:
                    _fill_images(f, targets[name], members.where(name), bar)
                elif name == CLASS_NAMES_FILE:
                    class_names = _class_names(f.read(), members.where(name))
                else:
                    labels[name] = np.frombuffer(f.read(), np.uint8).astype(np.int64) - 1
    for name, y in labels.items():
        if y.size and (y.min() < 0 or y.max() >= len(class_names)):
            raise DataError(f"{members.where(name)}: labels must lie in 1..{len(class_names)}, found "
                            f"{int(y.min()) + 1}..{int(y.max()) + 1}")
    train = pretrain[:n_train].copy()
    splits = {
        "train": SplitArrays(train, labels["train_y.bin"]),
        "test": SplitArrays(test, labels["test_y.bin"]),
        UNLABELED_SPLIT: SplitArrays(pretrain, np.zeros(len(pretrain), np.int64)),
    }
    return splits, class_names


def _class_names(raw: bytes, where: str) -> list[str]:
    try:
        names = [n.strip() for n in raw.decode("utf-8").splitlines() if n.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason})") from None
    if len(names) != len(CLASS_NAMES) or len(set(names)) != len(names):
        raise DataError(f"{where}: expected {len(CLASS_NAMES)} distinct class names, one per line")
    return names
