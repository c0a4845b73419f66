"""Dataset sources: find a dataset's original files (given path, system copy, download cache or a
fresh download) and read them into a :class:`SourceData`.

Sources: ``fashion-mnist`` and ``mnist`` (IDX files), ``cifar10`` and ``cifar100`` (the official
python-version archives), ``folder`` (one subfolder per class) and ``npz`` (arrays or JPEG bytes).

Only ``folder`` resizes or converts images: for the other sources ``size`` and ``grayscale`` are
accepted only when they describe the images as they are (e.g. ``size=32`` for CIFAR,
``grayscale=True`` for MNIST), and ``test_source`` / ``test_fraction`` are refused because the
test split comes with the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from onepoch.data import cifar, folder, idx, npz
from onepoch.data.download import download_dir, download_first, offline, verified_file
from onepoch.data.prepared import SourceData, SplitArrays, check_split
from onepoch.errors import DataError

SOURCE_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "folder", "npz")

IDX_SOURCES = ("fashion-mnist", "mnist")
CIFAR_SOURCES = ("cifar10", "cifar100")

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
CIFAR_URLS: dict[str, str] = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
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
CIFAR_SHA256: dict[str, str] = {
    "cifar10": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    "cifar100": "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
}


def _absolute(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _downloads_allowed(download_requested: bool) -> bool:
    return download_requested and not offline()


def _why_no_download(download_requested: bool) -> str:
    return "downloading is disabled (ONEPOCH_OFFLINE=1)" if download_requested else "downloading is disabled"


# --- IDX: fashion-mnist, mnist ---------------------------------------------------------------


def find_idx_files(directory: Path) -> dict[tuple[str, str], Path | None]:
    """The IDX files present in ``directory`` (plain name preferred over ``.gz``), None if absent."""
    found: dict[tuple[str, str], Path | None] = {}
    for key, stem in IDX_FILES.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        found[key] = next((c for c in candidates if c.is_file()), None)
    return found


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


def locate_source(name: str, source: str | os.PathLike | None = None, *, size: int | None = None,
                  test_source: str | os.PathLike | None = None, test_fraction: float | None = None,
                  grayscale: bool = False, seed: int = 0, download: bool = True) -> SourcePlan:
    """Find dataset source ``name`` (one of :data:`SOURCE_NAMES`) without decoding it (a missing
    built-in dataset may be downloaded here). See :func:`load_source` for the arguments."""
    if name not in SOURCE_NAMES:
        raise DataError(f"unknown dataset source {name!r} (valid: {', '.join(SOURCE_NAMES)})")
    if name in ("folder", "npz") and source is None:
        raise DataError(f"the {name} source needs a path (--source PATH)")

    if name == "folder":
        root = _absolute(source)
        test_root = _absolute(test_source) if test_source is not None else None
        request: dict[str, Any] = {"dataset": name, "source": str(root), "size": size,
                                   "grayscale": bool(grayscale)}
        if test_root is not None:
            request["test_source"] = str(test_root)
        else:
            fraction = folder.DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
            request.update(test_fraction=float(fraction), seed=int(seed))

        def read_folder() -> SourceData:
            splits, class_names = folder.read_image_folder(
                root, size=size, grayscale=grayscale, test_source=test_root,
                test_fraction=test_fraction, seed=seed)
            return SourceData(name, _checked(str(root), splits, class_names), class_names, str(root), request)

        return SourcePlan(name, request, read_folder)

    _refuse_split_options(name, test_source, test_fraction)
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

    def read() -> SourceData:
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


def load_source(name: str, source: str | os.PathLike | None = None, *, size: int | None = None,
                test_source: str | os.PathLike | None = None, test_fraction: float | None = None,
                grayscale: bool = False, seed: int = 0, download: bool = True) -> SourceData:
    """Read dataset source ``name`` (one of :data:`SOURCE_NAMES`) into train/test splits.

    ``source`` is a path (directory, archive or file, depending on the source); it is required for
    ``folder`` and ``npz``. ``size``, ``grayscale``, ``test_source``, ``test_fraction`` and
    ``seed`` shape a folder source (see :func:`onepoch.data.folder.read_image_folder`).
    ``download=False`` (or ``ONEPOCH_OFFLINE=1``) forbids fetching missing files.
    The result's ``request`` records the resolved inputs that determine the output.
    """
    return locate_source(name, source, size=size, test_source=test_source, test_fraction=test_fraction,
                         grayscale=grayscale, seed=seed, download=download).read()
