"""Dataset sources: find a dataset's original files (given path, system copy, download cache or a
fresh download) and read them into a :class:`SourceData`.

Sources stored raw (uint8 arrays): ``fashion-mnist`` and ``mnist`` (IDX files), ``cifar10`` and
``cifar100`` (the official python-version archives), ``tiny-imagenet`` (64x64, the CS231n zip or
folder), ``stl10`` (96x96, the binary release), ``folder`` (one subfolder per class, resized to
``size``) and ``npz`` (arrays or JPEG bytes).

Sources kept as JPEG at rest (:mod:`onepoch.data.encoded`): ``imagenette`` (and its
``imagenette-320`` / ``imagenette-160`` variants), ``imagenet`` (ILSVRC-2012 folders, no download),
``imagenet100`` (CMC's 100-class subset of it), and ``folder`` / ``npz`` with ``layout="jpeg"``.
``max_side`` caps their longer side and ``quality`` is the JPEG quality of re-encoded images.
``classes`` (a file of wnids, or a list) keeps a subset of the classes of ``imagenet``,
``imagenette*`` and ``tiny-imagenet``.

Only ``folder`` resizes or converts images to a ``size``: for the other sources ``size`` and
``grayscale`` are accepted only when they describe the images as they are (e.g. ``size=32`` for
CIFAR, ``grayscale=True`` for MNIST), and ``test_source`` / ``test_fraction`` are refused because
the test split comes with the data.

Each source's own facts (file names, URLs, pinned hashes) live with its reader (``IDX_SHA256`` in
:mod:`onepoch.data.idx`, ``CIFAR_SHA256`` in :mod:`onepoch.data.cifar`, ...); they are importable
from here too, where the dispatcher uses them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from onepoch.data import cifar, folder, idx, imagenet, npz, stl10, tiny_imagenet
from onepoch.data.cifar import CIFAR_SHA256, CIFAR_URLS
from onepoch.data.download import Archive, download_dir, download_first, offline, verified_file
from onepoch.data.encoded import DEFAULT_QUALITY
from onepoch.data.idx import (
    IDX_BASE_URLS,
    IDX_CLASS_NAMES,
    IDX_FILES,
    IDX_SHA256,
    SYSTEM_DIRS,
    SYSTEM_PACKAGES,
    find_idx_files,
)
from onepoch.data.imagenet import IMAGENET_HELP
from onepoch.data.prepared import SourceData, SplitArrays, check_split
from onepoch.errors import DataError

SOURCE_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "folder", "npz", "imagenette", "imagenette-320",
                "imagenette-160", "imagenet", "imagenet100", "tiny-imagenet", "stl10")

IDX_SOURCES = ("fashion-mnist", "mnist")
CIFAR_SOURCES = ("cifar10", "cifar100")
IMAGENETTE_SOURCES = ("imagenette", "imagenette-320", "imagenette-160")
IMAGENET_SOURCES = ("imagenet", "imagenet100")
ENCODED_SOURCES = (*IMAGENETTE_SOURCES, *IMAGENET_SOURCES)  # always JPEG at rest
LAYOUT_SOURCES = ("folder", "npz")  # raw by default, JPEG at rest with layout="jpeg"
SUBSET_SOURCES = (*IMAGENETTE_SOURCES, "imagenet", "tiny-imagenet")  # accept classes=
LAYOUTS = ("raw", "jpeg")
NATIVE_SHAPES = {"tiny-imagenet": (64, 64, 3), "stl10": (96, 96, 3)}

# The official archive of each source whose publisher pins only an MD5 (each pinned in its reader module).
ARCHIVES: dict[str, Archive] = {**imagenet.IMAGENETTE_ARCHIVES, "tiny-imagenet": tiny_imagenet.DOWNLOAD,
                                "stl10": stl10.DOWNLOAD}


def _absolute(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _downloads_allowed(download_requested: bool) -> bool:
    return download_requested and not offline()


def _why_no_download(download_requested: bool) -> str:
    return "downloading is disabled (ONEPOCH_OFFLINE=1)" if download_requested else "downloading is disabled"


# --- IDX: fashion-mnist, mnist ---------------------------------------------------------------


def _idx_help(name: str) -> str:
    """How a user can get the IDX files of ``name`` by hand."""
    files = ", ".join(f"{stem}.gz" for stem in IDX_FILES.values())
    manual = f"download {files} from {IDX_BASE_URLS[name][0]} into a directory and pass --source DIR"
    if name in SYSTEM_PACKAGES:
        return f"install them with `apt-get install {SYSTEM_PACKAGES[name]}`, or {manual}"
    return manual


def locate_idx(name: str, source: str | os.PathLike | None, download_requested: bool) -> Path:
    """The directory holding the four IDX files of ``name``.

    Order: ``source`` if given; the system directory (``SYSTEM_DIRS``); the download cache (each file
    checked against its pinned sha256, a wrong one deleted); else the missing files are downloaded into
    the cache from the mirrors of ``IDX_BASE_URLS`` (unless downloads are disabled).
    """
    if source is not None:
        directory = _absolute(source)
        if not directory.is_dir():
            raise DataError(f"{name} source {directory} is not a directory")
        missing = [IDX_FILES[key] for key, path in find_idx_files(directory).items() if path is None]
        if missing:
            raise DataError(f"{directory}: missing {name} file(s) {', '.join(missing)} (plain or .gz)")
        return directory
    system = SYSTEM_DIRS.get(name)
    if system is not None and all(find_idx_files(system).values()):
        return system
    cache = download_dir(name)
    missing = [stem for stem in IDX_FILES.values()
               if verified_file(cache / f"{stem}.gz", IDX_SHA256[name][stem]) is None]
    if not missing:
        return cache
    places = " or ".join(str(d) for d in (system, cache) if d is not None)
    if not _downloads_allowed(download_requested):
        raise DataError(f"{name}: files not found in {places} and "
                        f"{_why_no_download(download_requested)}; {_idx_help(name)}")
    bases = list(IDX_BASE_URLS[name])
    for stem in missing:
        try:
            url = download_first([f"{base}{stem}.gz" for base in bases], cache / f"{stem}.gz",
                                 sha256=IDX_SHA256[name][stem], desc=f"{name} {stem}.gz")
        except DataError as e:
            raise DataError(f"{name}: {e}; {_idx_help(name)}") from None
        working = url.removesuffix(f"{stem}.gz")
        bases.remove(working)
        bases.insert(0, working)  # try the mirror that worked first for the next files
    return cache


def read_idx_source(name: str, directory: Path) -> dict[str, SplitArrays]:
    """Both splits of an IDX dataset whose four files are in ``directory``."""
    files = find_idx_files(directory)
    num_classes = len(IDX_CLASS_NAMES[name])
    return {
        split: idx.read_idx_split(files[(split, "images")], files[(split, "labels")], num_classes)
        for split in ("train", "test")
    }


# --- CIFAR -----------------------------------------------------------------------------------


def locate_cifar(name: str, source: str | os.PathLike | None, download_requested: bool) -> Path:
    """The archive or extracted folder of ``name``: ``source`` if given, else the download cache (checked
    against the pinned sha256, a wrong file deleted), else a fresh download into the cache (unless
    downloads are disabled)."""
    if source is not None:
        return cifar.resolve_cifar_source(name, source)
    archive = cifar.LAYOUTS[name].archive
    cached = download_dir(name) / archive
    if verified_file(cached, CIFAR_SHA256[name]) is not None:
        return cached
    help_text = f"download {CIFAR_URLS[name]} and pass --source PATH (the archive or its folder)"
    if not _downloads_allowed(download_requested):
        raise DataError(f"{name}: {archive} not found in {cached.parent} and "
                        f"{_why_no_download(download_requested)}; {help_text}")
    try:
        download_first([CIFAR_URLS[name]], cached, sha256=CIFAR_SHA256[name], desc=f"{name} {archive}")
    except DataError as e:
        raise DataError(f"{name}: {e}; {help_text}") from None
    return cached


# --- archives: imagenette*, tiny-imagenet, stl10 ------------------------------------------------


def locate_archive(name: str, download_requested: bool) -> Path:
    """The official archive of ``name`` in the download cache (checked against its pinned MD5, a wrong
    file deleted), else downloaded there (unless downloads are disabled)."""
    archive = ARCHIVES[name]
    cached = download_dir(name) / archive.file
    if verified_file(cached, md5=archive.md5) is not None:
        return cached
    help_text = f"download {archive.url} and pass --source PATH (the archive or its extracted folder)"
    if not _downloads_allowed(download_requested):
        raise DataError(f"{name}: {archive.file} not found in {cached.parent} and "
                        f"{_why_no_download(download_requested)}; {help_text}")
    try:
        download_first([archive.url], cached, md5=archive.md5, desc=f"{name} {archive.file}")
    except DataError as e:
        raise DataError(f"{name}: {e}; {help_text}") from None
    return cached


def locate_imagenet(name: str, source: str | os.PathLike | None) -> Path:
    """The ImageNet directory holding train/ and val/: ``source``, else ``<cache>/downloads/imagenet``
    (where a copy may be put by hand; nothing is downloaded)."""
    if source is not None:
        return imagenet.resolve_imagenet_root(name, source)
    default = download_dir("imagenet")
    if (default / "train").is_dir() and (default / "val").is_dir():
        return default.resolve()
    raise DataError(f"{name}: no --source given and no copy in {default}; {IMAGENET_HELP}")


# --- option checks ---------------------------------------------------------------------------


def _refuse_split_options(name: str, test_source: Any, test_fraction: Any) -> None:
    if test_source is not None or test_fraction is not None:
        raise DataError(
            f"{name}: a test folder or test fraction applies only to folder sources "
            f"({name} comes with its own test split)"
        )


def _check_native_format(name: str, splits: dict[str, SplitArrays], size: int | None,
                         grayscale: bool) -> None:
    """``size`` / ``grayscale`` may only restate the images' own format for non-folder sources."""
    height, width, channels = splits["train"].images.shape[1:]
    if size is not None and (size != height or size != width):
        raise DataError(
            f"{name}: images are {height}x{width} and cannot be resized (--size {size}); "
            "only folder sources are resized"
        )
    if grayscale and channels != 1:
        raise DataError(f"{name}: images are RGB; grayscale conversion applies only to folder sources")


def _checked(where: str, splits: dict[str, SplitArrays], class_names: list[str]) -> dict[str, SplitArrays]:
    """Every split validated and in canonical form (see :func:`check_split`); errors name ``where``."""
    try:
        return {s: check_split(s, a.images, a.labels, len(class_names)) for s, a in splits.items()}
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


# --- entry point -----------------------------------------------------------------------------


def _check_layout_options(name: str, layout: str | None, max_side: int | None, quality: int | None,
                          classes: Any, size: int | None, grayscale: bool) -> str:
    """The layout ``name`` is written in ("raw" or "jpeg"), after refusing options that do not apply."""
    if layout is not None and layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r} (valid: {', '.join(LAYOUTS)})")
    if name in ENCODED_SOURCES:
        if layout == "raw":
            raise DataError(f"{name} is kept as JPEG at rest (--layout jpeg); to get raw arrays of a chosen size, "
                            "prepare its folders with `folder --size N`")
        chosen = "jpeg"
    elif name in LAYOUT_SOURCES:
        chosen = layout or "raw"
    else:
        if layout == "jpeg":
            raise DataError(f"{name} is stored raw; --layout jpeg applies to {', '.join(LAYOUT_SOURCES)}")
        chosen = "raw"
    if chosen == "jpeg":
        if size is not None:
            raise DataError(f"{name}: JPEG-at-rest images keep their size (--size {size} applies to raw folders); "
                            "cap the longer side with --max-side N instead")
        if grayscale:
            raise DataError(f"{name}: JPEG-at-rest images are kept in colour (--grayscale applies to raw folders)")
        if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
            raise DataError(f"--max-side must be a positive integer, got {max_side!r}")
        if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int)
                                    or not 1 <= quality <= 100):
            raise DataError(f"--quality must be an integer in 1..100, got {quality!r}")
    elif max_side is not None or quality is not None:
        raise DataError(f"{name}: --max-side and --quality apply to JPEG-at-rest datasets "
                        f"({', '.join(ENCODED_SOURCES)}, or folder/npz with --layout jpeg)")
    if classes is not None and name not in SUBSET_SOURCES:
        hint = "; use `imagenet --classes FILE` for another subset" if name == "imagenet100" else ""
        raise DataError(f"{name}: --classes applies to {', '.join(SUBSET_SOURCES)}{hint}")
    return chosen


def _class_subset(classes: str | os.PathLike | Sequence[str] | None) -> list[str] | None:
    """The sorted wnids of ``classes``: a file (one per line) or a list."""
    if classes is None:
        return None
    if isinstance(classes, (str, os.PathLike)):
        return imagenet.read_class_list(classes)
    names = [str(c) for c in classes]
    if not names or len(set(names)) != len(names):
        raise DataError("classes must list distinct class names (wnids)")
    return sorted(names)


def _check_native_shape(name: str, size: int | None, grayscale: bool) -> None:
    """``size`` / ``grayscale`` may only restate the fixed image shape of ``name`` (checked before reading)."""
    height, width, _ = NATIVE_SHAPES[name]
    if size is not None and size != height:
        raise DataError(f"{name}: images are {height}x{width} and cannot be resized (--size {size}); "
                        "only folder sources are resized")
    if grayscale:
        raise DataError(f"{name}: images are RGB; grayscale conversion applies only to folder sources")


@dataclass
class SourcePlan:
    """A located dataset source: ``request`` says what it is (resolved paths, options, and the size
    and modification time of the files read), ``read()`` decodes it into a :class:`SourceData`."""

    name: str
    request: dict[str, Any]
    read: Callable[[], SourceData]


def _file_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamp_tree(base: Path, roots: list[Path]) -> dict[str, Any]:
    for root in roots:
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a directory")
    return folder.tree_stamp(base, roots)


def _unlabelled_folder_plan(root: Path, layout: str, *, size: int | None, grayscale: bool, test_source: Any,
                            test_fraction: Any, jpeg: dict[str, Any]) -> SourcePlan:
    """``folder --unlabelled``: every image under ``root`` at any depth, one split marked "labelled": false."""
    if test_source is not None or test_fraction is not None:
        raise DataError("folder --unlabelled: an unlabelled folder has a single split, no test split "
                        "(--test-source and --test-fraction apply to folders with one subfolder per class)")
    paths = folder.list_unlabelled_folder(root)
    request: dict[str, Any] = {"dataset": "folder", "source": str(root), "unlabelled": True,
                               **({"size": size, "grayscale": bool(grayscale)} if layout == "raw"
                                  else {"layout": "jpeg", **jpeg}),
                               "files": folder.listing_stamp(root, paths)}
    class_names, unlabelled = folder.UNLABELLED_CLASS_NAMES, (folder.UNLABELLED_SPLIT,)

    def read() -> SourceData:
        if layout == "jpeg":
            splits: dict[str, Any] = {folder.UNLABELLED_SPLIT: folder.encoded_files(paths, [0] * len(paths))}
        else:
            splits = _checked(str(root), folder.read_unlabelled_folder(paths, size=size, grayscale=grayscale),
                              class_names)
        return SourceData("folder", splits, class_names, str(root), request, max_side=jpeg.get("max_side"),
                          quality=jpeg.get("quality", DEFAULT_QUALITY), unlabeled_splits=unlabelled)

    return SourcePlan("folder", request, read)


def locate_source(name: str, source: str | os.PathLike | None = None, *, size: int | None = None,
                  test_source: str | os.PathLike | None = None, test_fraction: float | None = None,
                  grayscale: bool = False, seed: int = 0, download: bool = True, layout: str | None = None,
                  max_side: int | None = None, quality: int | None = None,
                  classes: str | os.PathLike | Sequence[str] | None = None, unlabelled: bool = False) -> SourcePlan:
    """Find dataset source ``name`` (one of :data:`SOURCE_NAMES`) without decoding it (a missing
    built-in dataset may be downloaded here). See :func:`load_source` for the arguments."""
    if name not in SOURCE_NAMES:
        raise DataError(f"unknown dataset source {name!r} (valid: {', '.join(SOURCE_NAMES)})")
    if name in ("folder", "npz") and source is None:
        raise DataError(f"the {name} source needs a path (--source PATH)")
    chosen = _check_layout_options(name, layout, max_side, quality, classes, size, grayscale)
    quality = DEFAULT_QUALITY if quality is None else quality
    jpeg = {"max_side": max_side, "quality": quality} if chosen == "jpeg" else {}
    subset = _class_subset(classes)

    def encoded(splits: dict[str, Any], class_names: list[str], where: str, request: dict[str, Any]) -> SourceData:
        return SourceData(name, splits, class_names, where, request, max_side=max_side, quality=quality)

    if unlabelled and name != "folder":
        raise DataError(f"{name}: --unlabelled applies to folder sources (any tree of images)")
    if name == "folder" and unlabelled:
        return _unlabelled_folder_plan(_absolute(source), chosen, size=size, grayscale=grayscale,
                                       test_source=test_source, test_fraction=test_fraction, jpeg=jpeg)
    if name == "folder":
        root = _absolute(source)
        test_root = _absolute(test_source) if test_source is not None else None
        request: dict[str, Any] = {"dataset": name, "source": str(root)}
        if chosen == "raw":
            request.update(size=size, grayscale=bool(grayscale))
        else:
            request.update(layout="jpeg", **jpeg)
        if test_root is not None:
            request["test_source"] = str(test_root)
        else:
            fraction = folder.DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
            request.update(test_fraction=float(fraction), seed=int(seed))
        if chosen == "jpeg":  # the folders' modification times: cheap at ImageNet scale
            request["tree"] = _stamp_tree(root, [root])
            if test_root is not None:
                request["test_tree"] = _stamp_tree(test_root, [test_root])
        else:  # every image's name, size and modification time: raw folders are small, all decoded anyway
            for r in [root] if test_root is None else [root, test_root]:
                if not r.is_dir():
                    raise DataError(f"image folder {r} does not exist or is not a directory")
            request["files"] = folder.files_stamp([root])
            if test_root is not None:
                request["test_files"] = folder.files_stamp([test_root])

        def read_folder() -> SourceData:
            if chosen == "jpeg":
                splits, class_names = folder.read_image_folder_encoded(
                    root, test_source=test_root, test_fraction=test_fraction, seed=seed)
                return encoded(splits, class_names, str(root), request)
            splits, class_names = folder.read_image_folder(
                root, size=size, grayscale=grayscale, test_source=test_root,
                test_fraction=test_fraction, seed=seed)
            return SourceData(name, _checked(str(root), splits, class_names), class_names, str(root), request)

        return SourcePlan(name, request, read_folder)

    _refuse_split_options(name, test_source, test_fraction)
    if name in IMAGENETTE_SOURCES or name in IMAGENET_SOURCES:
        return _locate_imagenet_family(name, source, download, jpeg, subset, encoded)
    if name in NATIVE_SHAPES:
        return _locate_native(name, source, download, size, grayscale, subset)
    if name in IDX_SOURCES:
        location = locate_idx(name, source, download)
        files = [p for p in find_idx_files(location).values() if p is not None]
    elif name in CIFAR_SOURCES:
        location = locate_cifar(name, source, download)
        files = [location] if location.is_file() else sorted(p for p in location.iterdir() if p.is_file())
    else:  # npz
        location = _absolute(source)
        if not location.is_file():
            raise DataError(f"npz source {location} does not exist")
        files = [location]
    resolved = location.resolve()
    request = {"dataset": name, "source": str(resolved),
               "files": {str(p.resolve().relative_to(resolved) if p != location else p.name): _file_stamp(p)
                         for p in files}}
    if chosen == "jpeg":
        request.update(layout="jpeg", **jpeg)

    def read() -> SourceData:
        if chosen == "jpeg":  # npz of JPEG bytes, kept as they are
            splits, class_names = npz.read_npz_encoded(location)
            return encoded(splits, class_names, str(resolved), request)
        if name in IDX_SOURCES:
            splits = read_idx_source(name, location)
            class_names = list(IDX_CLASS_NAMES[name])
        elif name in CIFAR_SOURCES:
            splits, class_names = cifar.read_cifar(name, location)
        else:
            splits, class_names = npz.read_npz(location)
        splits = _checked(str(resolved), splits, class_names)
        _check_native_format(name, splits, size, grayscale)
        return SourceData(name, splits, class_names, str(resolved), request)

    return SourcePlan(name, request, read)


def _locate_imagenet_family(name: str, source: str | os.PathLike | None, download: bool, jpeg: dict[str, Any],
                            subset: list[str] | None, encoded: Callable[..., SourceData]) -> SourcePlan:
    """imagenette* (folder or .tgz) and imagenet / imagenet100 (folders), JPEG at rest."""
    request: dict[str, Any] = {"dataset": name}
    if name in IMAGENETTE_SOURCES:
        location = (imagenet.resolve_imagenette(name, source, ARCHIVES[name].file) if source is not None
                    else locate_archive(name, download))
    else:
        location = locate_imagenet(name, source)
        if name == "imagenet100":
            subset = imagenet.imagenet100_classes()
    request.update(source=str(location), **jpeg)
    if location.is_file():
        request["files"] = {location.name: _file_stamp(location)}
    else:
        request["tree"] = _stamp_tree(location, [location / "train", location / "val"])
        if imagenet.val_is_flat(location / "val"):
            solution = imagenet.find_val_solution(location, _absolute(source) if source is not None else None)
            if solution is None:
                raise DataError(f"{location / 'val'}: the validation images are not sorted into class folders and "
                                f"no {imagenet.VAL_SOLUTION} was found; {imagenet.SORT_VAL_HELP}")
            request["files"] = {str(solution): _file_stamp(solution)}
    if subset is not None:
        request["classes"] = subset

    def read() -> SourceData:
        if location.is_file():
            splits, wnids = imagenet.read_imagenette_archive(location, subset)
        else:
            splits, wnids = imagenet.read_class_folders(location, subset,
                                                        _absolute(source) if source is not None else None)
        names = imagenet.imagenette_class_names(wnids) if name in IMAGENETTE_SOURCES else wnids
        return encoded(splits, names, str(location), request)

    return SourcePlan(name, request, read)


def _locate_native(name: str, source: str | os.PathLike | None, download: bool, size: int | None,
                   grayscale: bool, subset: list[str] | None) -> SourcePlan:
    """tiny-imagenet and stl10: an archive (given, cached or downloaded) or its extracted folder, raw."""
    _check_native_shape(name, size, grayscale)
    if source is None:
        location = locate_archive(name, download)
    elif name == "tiny-imagenet":
        location = tiny_imagenet.resolve_tiny_imagenet(source)
    else:
        location = stl10.resolve_stl10(source)
    request: dict[str, Any] = {"dataset": name, "source": str(location)}
    if location.is_file():
        request["files"] = {location.name: _file_stamp(location)}
    elif name == "tiny-imagenet":
        request["files"] = {n: _file_stamp(location / n) for n in ("wnids.txt", "words.txt", "val/val_annotations.txt")
                            if (location / n).is_file()}
        request["tree"] = folder.tree_stamp(location, tiny_imagenet.stamp_dirs(location))
    else:
        request["files"] = {n: _file_stamp(location / n) for n in (*stl10.FILES, stl10.CLASS_NAMES_FILE)
                            if (location / n).is_file()}
    if subset is not None:
        request["classes"] = subset
    if name == "stl10":
        request["unlabeled_splits"] = [stl10.UNLABELED_SPLIT]  # its labels are all 0 and mean nothing

    def read() -> SourceData:
        if name == "tiny-imagenet":
            splits, class_names, _ = tiny_imagenet.read_tiny_imagenet(location, subset)
        else:
            splits, class_names = stl10.read_stl10(location)
        return SourceData(name, _checked(str(location), splits, class_names), class_names, str(location), request,
                          unlabeled_splits=stl10.UNLABELED_SPLITS if name == "stl10" else ())

    return SourcePlan(name, request, read)


def load_source(name: str, source: str | os.PathLike | None = None, *, size: int | None = None,
                test_source: str | os.PathLike | None = None, test_fraction: float | None = None,
                grayscale: bool = False, seed: int = 0, download: bool = True, layout: str | None = None,
                max_side: int | None = None, quality: int | None = None,
                classes: str | os.PathLike | Sequence[str] | None = None, unlabelled: bool = False) -> SourceData:
    """Read dataset source ``name`` (one of :data:`SOURCE_NAMES`) into train/test splits.

    ``source`` is a path (directory, archive or file, depending on the source); it is required for
    ``folder`` and ``npz``. ``size``, ``grayscale``, ``test_source``, ``test_fraction`` and
    ``seed`` shape a folder source (see :func:`onepoch.data.folder.read_image_folder`).
    ``layout="jpeg"`` keeps a folder's or an npz's JPEG bytes (JPEG at rest) instead of raw arrays;
    ``max_side`` and ``quality`` apply to JPEG-at-rest sources (longer side cap; JPEG quality of the
    images encoded again, default 95). ``classes`` (a file of wnids, one per line, or a list) keeps a
    subset of the classes of imagenet, imagenette* and tiny-imagenet. ``unlabelled=True`` reads a folder as
    every image under it at any depth (no class folders needed) into one ``train`` split marked
    ``"labelled": false`` in its meta.json.
    ``download=False`` (or ``ONEPOCH_OFFLINE=1``) forbids fetching missing files.
    The result's ``request`` records the resolved inputs that determine the output. JPEG-at-rest
    splits are :class:`onepoch.data.encoded.EncodedSource` (read when written by ``write_prepared``).
    """
    return locate_source(name, source, size=size, test_source=test_source, test_fraction=test_fraction,
                         grayscale=grayscale, seed=seed, download=download, layout=layout, max_side=max_side,
                         quality=quality, classes=classes, unlabelled=unlabelled).read()
