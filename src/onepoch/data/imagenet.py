"""ImageNet-style sources kept as JPEG at rest: Imagenette, ImageNet (ILSVRC-2012) and ImageNet-100.

Layout read (``ROOT`` is the ``--source`` directory)::

    ROOT/train/<wnid>/*.JPEG      one folder per class (the listing rules of onepoch.data.folder)
    ROOT/val/<wnid>/*.JPEG        the validation images sorted into the same class folders, or
    ROOT/val/*.JPEG               flat, labelled by Kaggle's LOC_val_solution.csv (looked for in ROOT,
                                  in val/ and in the three folders above ROOT)

Kaggle's ``ILSVRC/Data/CLS-LOC/`` below ROOT is found too. ``train`` becomes the ``train`` split and
``val`` the ``test`` split. Labels are the class folders in sorted order (torchvision's ImageFolder
order); ``classes`` (``--classes FILE``) keeps a subset of the wnids, and ImageNet-100 is the subset
shipped in ``imagenet100_classes.txt`` (CMC's list, also used by EMP-SSL).

Imagenette (fast.ai) has the same layout; it is also read straight from its ``.tgz`` archive, member
by member, without extracting anything (one pass to list the archive, one per split to read it).

Nothing is decoded here: each split is an :class:`onepoch.data.encoded.EncodedSource`, and every image
is checked (and kept or re-encoded) when the split is written.
"""

from __future__ import annotations

import csv
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from onepoch.data.download import Archive
from onepoch.data.encoded import EncodedSource
from onepoch.data.folder import IMAGE_EXTENSIONS, _check_same_classes, _visible_entries, encoded_files, \
    list_image_folder
from onepoch.errors import DataError, one_line

IMAGENET100_FILE = Path(__file__).with_name("imagenet100_classes.txt")
VAL_SOLUTION = "LOC_val_solution.csv"
# fast.ai's Imagenette releases, with the MD5 torchvision pins for each.
IMAGENETTE_ARCHIVES: dict[str, Archive] = {
    "imagenette": Archive("imagenette2.tgz", "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz",
                          "fe2fc210e6bb7c5664d602c3cd71e612"),
    "imagenette-320": Archive("imagenette2-320.tgz", "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
                              "3df6f0d01a2c9592104656642f5e78a3"),
    "imagenette-160": Archive("imagenette2-160.tgz", "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
                              "e793b78cc4c9e9a4ccc0c1155377a412"),
}
IMAGENET_HELP = ("ImageNet has no public download: get ILSVRC-2012 from https://image-net.org (after accepting its "
                 "terms), extract train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (or val/*.JPEG with Kaggle's "
                 "LOC_val_solution.csv) into a directory and pass --source DIR")
KAGGLE_SUBDIR = Path("ILSVRC/Data/CLS-LOC")

# The ten Imagenette classes (wnid -> the first of ImageNet's names, as torchvision's Imagenette has them).
IMAGENETTE_NAMES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}

SORT_VAL_HELP = ("sort the validation images into val/<wnid>/ folders (e.g. with the valprep.sh script that "
                 "torchvision's ImageNet example points to), or put Kaggle's LOC_val_solution.csv beside train/")


# --- class lists -----------------------------------------------------------------------------------



def requested_classes(classes, available, problem: str) -> list[str]:
    """The sorted ``classes`` asked for with ``--classes``, all of which must be in ``available``; else a
    DataError ``"<problem> N of the requested class(es): ..."``."""
    missing = sorted(set(classes) - set(available))
    if missing:
        raise DataError(f"{problem} {len(missing)} of the requested class(es): {', '.join(missing[:5])}")
    return sorted(classes)

def read_class_list(path: str | os.PathLike) -> list[str]:
    """The class folder names (wnids) listed in a text file: one per line; blank lines and lines
    starting with '#' are ignored. Sorted (labels follow this order)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--classes {path}: cannot read ({one_line(e)})") from None
    names: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line.split()) != 1 or line.startswith("."):
            raise DataError(f"{path}:{number}: expected one class folder name (a wnid) per line, got {line!r}")
        names.append(line)
    if not names:
        raise DataError(f"{path}: lists no classes (one wnid per line)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: class {duplicates[0]} is listed more than once")
    return sorted(names)


def imagenet100_classes() -> list[str]:
    """The 100 wnids of ImageNet-100 (CMC, Tian et al. 2019; also EMP-SSL's), sorted."""
    return read_class_list(IMAGENET100_FILE)


def imagenette_class_names(wnids: Sequence[str]) -> list[str]:
    """Human names of Imagenette's wnids (a wnid it does not know keeps its wnid)."""
    return [IMAGENETTE_NAMES.get(w, w) for w in wnids]


# --- folders -----------------------------------------------------------------------------------------


def resolve_imagenet_root(name: str, source: str | os.PathLike) -> Path:
    """The directory holding ``train/`` and ``val/``: ``source`` itself or Kaggle's ``ILSVRC/Data/CLS-LOC``
    below it."""
    path = Path(source).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"{name} source {path} is not a directory (expected train/ and val/ inside)")
    for root in (path, path / KAGGLE_SUBDIR):
        if (root / "train").is_dir() and (root / "val").is_dir():
            return root
    missing = [d for d in ("train", "val") if not (path / d).is_dir()]
    raise DataError(f"{path}: no {' and no '.join(d + '/' for d in missing)} folder (expected train/<wnid>/*.JPEG "
                    f"and val/<wnid>/*.JPEG, or Kaggle's {KAGGLE_SUBDIR}/)")


def val_is_flat(val: Path) -> bool:
    """True when ``val`` holds the images themselves (not sorted into class folders)."""
    entries = _visible_entries(val)
    dirs = [e for e in entries if e.is_dir()]
    files = [e for e in entries if not e.is_dir()]
    if dirs and files:
        raise DataError(f"{val}: holds both class folders ({dirs[0].name}, ...) and loose files ({files[0].name}, "
                        "...); expected one or the other")
    return bool(files) and not dirs


def find_val_solution(root: Path, source: Path | None = None) -> Path | None:
    """Kaggle's LOC_val_solution.csv for a flat val/: in ``root``, ``root/val``, ``source`` or the three
    folders above ``root`` (Kaggle puts it three levels above CLS-LOC/)."""
    places = [root, root / "val", *([source] if source is not None else []), *list(root.parents)[:3]]
    return next((p / VAL_SOLUTION for p in places if (p / VAL_SOLUTION).is_file()), None)


def read_val_solution(path: Path) -> dict[str, str]:
    """image id (file name without extension) -> wnid, from LOC_val_solution.csv
    (``ImageId,PredictionString``; the first word of PredictionString is the wnid)."""
    mapping: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise DataError(f"{path}: expected the header ImageId,PredictionString (Kaggle's {VAL_SOLUTION})")
            for number, row in enumerate(rows, 2):
                if not row:
                    continue
                words = row[1].split() if len(row) >= 2 else []
                if not words or not row[0].strip():
                    raise DataError(f"{path}:{number}: expected ImageId,<wnid> <box> ..., got {','.join(row)!r}")
                mapping[row[0].strip()] = words[0]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({one_line(e)})") from None
    return mapping


def _flat_val(val: Path, solution: Path, wnids: Sequence[str]) -> EncodedSource:
    """A flat val/ labelled by LOC_val_solution.csv; images of classes not in ``wnids`` are left out."""
    mapping = read_val_solution(solution)
    label_of = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for e in _visible_entries(val):
        if not e.name.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"{val / e.name}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
        wnid = mapping.get(e.name.rsplit(".", 1)[0])
        if wnid is None:
            raise DataError(f"{val / e.name}: not listed in {solution}")
        if wnid in label_of:
            paths.append(val / e.name)
            labels.append(label_of[wnid])
    if not paths:
        raise DataError(f"{val}: no validation image of the selected classes (labels from {solution})")
    return encoded_files(paths, np.asarray(labels, np.int64))


def read_class_folders(root: Path, classes: Sequence[str] | None = None, source: Path | None = None
                       ) -> tuple[dict[str, EncodedSource], list[str]]:
    """``root/train`` and ``root/val`` as JPEG-at-rest splits {"train", "test"} and the class folder
    names (wnids) in label order. ``classes`` keeps only those class folders."""
    train = list_image_folder(root / "train", classes)
    val = root / "val"
    if val_is_flat(val):
        solution = find_val_solution(root, source)
        if solution is None:
            raise DataError(f"{val}: the validation images are not sorted into class folders and no "
                            f"{VAL_SOLUTION} was found; {SORT_VAL_HELP}")
        test = _flat_val(val, solution, train.class_names)
    else:
        listing = list_image_folder(val, train.class_names if classes is not None else None)
        _check_same_classes(train, listing)
        test = encoded_files(listing.paths, listing.labels)
    return {"train": encoded_files(train.paths, train.labels), "test": test}, train.class_names


# --- Imagenette archives --------------------------------------------------------------------------


def _archive_error(archive: Path, e: BaseException) -> DataError:
    return DataError(f"{archive}: cannot read ({one_line(e)}); the archive is truncated or corrupt")


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def list_imagenette_archive(archive: Path, classes: Sequence[str] | None = None
                            ) -> tuple[dict[str, dict[str, int]], list[str]]:
    """{split: {member name: label}} of an Imagenette ``.tgz`` (``*/train/<wnid>/<image>`` and
    ``*/val/<wnid>/<image>``; anything else in the archive, like noisy_imagenette.csv, is ignored) and
    the class folder names in label order."""
    found: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}}
    prefixes = set()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if len(parts) < 3 or parts[-3] not in found or any(p.startswith(".") for p in parts):
                    continue
                if not member.isfile():
                    if member.isdir():
                        continue
                    raise DataError(f"{archive}:{member.name}: not a regular file")
                if not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
                    raise DataError(f"{archive}:{member.name}: not an image file (expected "
                                    f"{', '.join(IMAGE_EXTENSIONS)})")
                prefixes.add("/".join(parts[:-3]))
                found[parts[-3]].setdefault(parts[-2], []).append(member.name)
    except DataError:
        raise
    except _TAR_ERRORS as e:
        raise _archive_error(archive, e) from None
    if len(prefixes) > 1:
        raise DataError(f"{archive}: holds several datasets ({', '.join(sorted(prefixes))}); pass one of them")
    for split in ("train", "val"):
        if not found[split]:
            raise DataError(f"{archive}: no {split}/<wnid>/<image> members (not an Imagenette archive?)")
    wnids = sorted(found["train"])
    if classes is not None:
        wnids = requested_classes(classes, wnids, f"{archive}: no class folder for")
    elif sorted(found["val"]) != wnids:
        raise DataError(f"{archive}: val/ has other class folders than train/")
    if len(wnids) < 2:
        raise DataError(f"{archive}: a dataset needs at least two classes, found {len(wnids)}")
    members = {}
    for split in ("train", "val"):
        missing = [w for w in wnids if w not in found[split]]
        if missing:
            raise DataError(f"{archive}: {split}/ has no images of class {missing[0]}")
        members[split] = {m: label for label, w in enumerate(wnids) for m in sorted(found[split][w])}
    return members, wnids


def _archive_records(archive: Path, members: dict[str, int]) -> Iterator[tuple[str, bytes, int]]:
    """(archive:member, bytes, label) of ``members``, in archive order, in one pass over the archive."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                label = members.get(member.name)
                if label is None:
                    continue
                f = tar.extractfile(member)
                if f is None:
                    raise DataError(f"{archive}:{member.name}: not a regular file")
                yield f"{archive}:{member.name}", f.read(), label
    except DataError:
        raise
    except _TAR_ERRORS as e:
        raise _archive_error(archive, e) from None


def read_imagenette_archive(archive: Path, classes: Sequence[str] | None = None
                            ) -> tuple[dict[str, EncodedSource], list[str]]:
    """An Imagenette ``.tgz`` as JPEG-at-rest splits {"train", "test"} and its wnids in label order."""
    members, wnids = list_imagenette_archive(archive, classes)
    splits = {}
    for split, folder in (("train", "train"), ("test", "val")):
        chosen = members[folder]
        splits[split] = EncodedSource(len(chosen), lambda chosen=chosen: _archive_records(archive, chosen))
    return splits, wnids


def is_imagenette_dir(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "val").is_dir()


def resolve_imagenette(name: str, source: str | os.PathLike, archive_name: str) -> Path:
    """The Imagenette folder (holding train/ and val/) or ``.tgz`` archive for ``source``: the archive
    itself, the extracted folder, or a directory holding exactly one of them (``archive_name`` and its
    folder preferred)."""
    path = Path(source).expanduser().resolve()
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"{name} source {path} does not exist")
    if is_imagenette_dir(path):
        return path
    folder_name = re.sub(r"\.(tgz|tar\.gz|tar)$", "", archive_name)
    for preferred in (path / folder_name, path / archive_name):
        if (preferred.is_dir() and is_imagenette_dir(preferred)) or preferred.is_file():
            return preferred
    candidates = sorted(p for p in path.glob("imagenette2*") if (p.is_dir() and is_imagenette_dir(p))
                        or (p.is_file() and p.name.endswith((".tgz", ".tar.gz"))))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise DataError(f"{path}: holds several Imagenette copies ({', '.join(p.name for p in candidates)}); "
                        "pass one of them with --source")
    raise DataError(f"{path}: holds neither {archive_name} nor an Imagenette folder (train/<wnid>/*.JPEG and "
                    "val/<wnid>/*.JPEG)")
