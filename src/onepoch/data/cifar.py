"""CIFAR-10 / CIFAR-100 from the official "python version" files, read without trusting pickle.

The batches are Python pickles. They are never loaded with plain ``pickle.load``: a restricted
unpickler resolves only the three numpy globals a well-formed batch refers to (``_reconstruct``,
``ndarray``, ``dtype``) and refuses every other global *before* anything is called, so a crafted
file cannot run code. The result is then checked structurally (a dict whose ``data`` is a uint8
(n, 3072) array and whose labels are n integers in range).

A source is the ``.tar.gz`` archive (read member by member straight from the tar, nothing is
extracted to disk), a directory holding the archive, the extracted folder
(``cifar-10-batches-py`` / ``cifar-100-python``), or a directory holding that folder. The official
download URLs and their pinned sha256s are here too (:mod:`onepoch.data.sources` fetches them).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from onepoch.data.prepared import SplitArrays
from onepoch.errors import DataError, one_line
from onepoch.progress import progress

IMAGE_SHAPE = (32, 32, 3)
ROW_BYTES = 32 * 32 * 3

# The official downloads, and the sha256 of each: a download (or a cached copy) with another hash is
# deleted, never used (the same values as TensorFlow Datasets / Keras; they match torchvision's MD5s).
CIFAR_URLS: dict[str, str] = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
CIFAR_SHA256: dict[str, str] = {
    "cifar10": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    "cifar100": "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
}


@dataclass(frozen=True)
class CifarLayout:
    """File and key names of one CIFAR variant's python-version release."""

    name: str
    archive: str
    folder: str
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    meta_member: str
    labels_key: str
    names_key: str
    num_classes: int

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train_members, *self.test_members, self.meta_member)


LAYOUTS = {
    "cifar10": CifarLayout(
        name="cifar10",
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_members=("test_batch",),
        meta_member="batches.meta",
        labels_key="labels",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": CifarLayout(
        name="cifar100",
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_members=("train",),
        test_members=("test",),
        meta_member="meta",
        labels_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
    ),
}


def _numpy_multiarray():
    """numpy's multiarray module under its current name (``numpy._core`` on NumPy 2, where
    importing ``numpy.core`` warns; ``numpy.core`` on old NumPy)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy < 1.26 has no numpy._core
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


_MULTIARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")


def _allowed_global(module: str, name: str) -> Any | None:
    """The object a well-formed CIFAR batch may refer to by (module, name); None for anything else."""
    if module in _MULTIARRAY_MODULES and name == "_reconstruct":
        return _numpy_multiarray()._reconstruct
    if module == "numpy" and name == "ndarray":
        return np.ndarray
    if module == "numpy" and name == "dtype":
        return np.dtype
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy's ``_reconstruct``, ``ndarray`` and ``dtype``.

    Any other global (``os.system``, ``builtins.eval``, ...) raises :class:`DataError` at lookup
    time, before it could be called. ``where`` names the file in error messages.
    """

    def __init__(self, file, *, where: str):
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(module, name)
        if found is None:
            raise DataError(
                f"{self.where}: refusing to unpickle {module}.{name} "
                "(not part of a CIFAR batch; the file is corrupt or malicious)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.where}: refusing to unpickle a persistent id (not a CIFAR batch)")


def unpickle_restricted(data: bytes, where: str) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; any failure becomes a DataError."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), where=where).load()
    except DataError:
        raise
    except Exception as e:  # untrusted input: pickle can fail with many exception types
        raise DataError(f"{where}: not a valid pickle ({one_line(e)})") from None


def _get(d: dict, key: str) -> Any:
    """``d[key]`` for a dict from a Python 2 pickle (bytes keys) or a Python 3 one (str keys)."""
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise DataError(f"missing key {key!r}")


def batch_to_split(obj: Any, where: str, layout: CifarLayout) -> SplitArrays:
    """Check one unpickled batch and convert it to (n, 32, 32, 3) uint8 images, int64 labels."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict, found {type(obj).__name__}")
    try:
        data = _get(obj, "data")
        labels_raw = _get(obj, layout.labels_key)
    except DataError as e:
        raise DataError(f"{where}: not a {layout.name} batch ({e})") from None
    if not isinstance(data, np.ndarray):
        raise DataError(f"{where}: 'data' is a {type(data).__name__}, expected a numpy array")
    if data.dtype == object:
        raise DataError(f"{where}: 'data' is an object array (refused)")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        raise DataError(
            f"{where}: 'data' must be uint8 (n, {ROW_BYTES}), found {data.dtype} {data.shape}"
        )
    if not isinstance(labels_raw, (list, np.ndarray)):
        raise DataError(f"{where}: labels are a {type(labels_raw).__name__}, expected a list")
    if isinstance(labels_raw, np.ndarray) and labels_raw.dtype == object:
        raise DataError(f"{where}: labels are an object array (refused)")
    if isinstance(labels_raw, list) and not all(type(v) is int for v in labels_raw):
        raise DataError(f"{where}: labels must all be integers")
    labels = np.asarray(labels_raw)
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or (
        labels.size and not np.issubdtype(labels.dtype, np.integer)
    ):
        raise DataError(
            f"{where}: expected {data.shape[0]} integer labels, found {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DataError(
            f"{where}: labels must lie in 0..{layout.num_classes - 1}, "
            f"found {int(labels.min())}..{int(labels.max())}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel planes -> NHWC
    return SplitArrays(np.ascontiguousarray(images), labels.astype(np.int64))


def meta_to_class_names(obj: Any, where: str, layout: CifarLayout) -> list[str]:
    """Check the unpickled meta member and return its class names as str."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict, found {type(obj).__name__}")
    try:
        names = _get(obj, layout.names_key)
    except DataError as e:
        raise DataError(f"{where}: not a {layout.name} meta file ({e})") from None
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise DataError(f"{where}: {layout.names_key!r} must be a list of {layout.num_classes} names")
    out = []
    for n in names:
        if isinstance(n, bytes):
            try:
                n = n.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: class name {n!r} is not UTF-8") from None
        if not isinstance(n, str):
            raise DataError(f"{where}: class names must be strings, found {type(n).__name__}")
        out.append(n)
    return out


def resolve_cifar_source(name: str, source: str | os.PathLike) -> Path:
    """The absolute path of the archive or of the folder with the batch files for ``source``.

    ``source`` may be the archive itself, the extracted folder, or a directory holding either.
    """
    layout = LAYOUTS[name]
    path = Path(source).expanduser().resolve()
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"{name} source {path} does not exist")
    if path.name == layout.folder or (path / layout.meta_member).is_file():
        return path
    for candidate in (path / layout.archive, path / layout.folder):
        if candidate.exists():
            return candidate
    raise DataError(
        f"{path}: contains neither {layout.archive} nor a {layout.folder}/ folder "
        f"nor the {name} batch files ({', '.join(layout.members)})"
    )


def _members_from_archive(archive: Path, layout: CifarLayout) -> Iterator[tuple[str, bytes]]:
    """(member name, raw bytes) of the wanted members, read in one pass over the tar."""
    wanted = set(layout.members)
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            base = member.name.rstrip("/").rsplit("/", 1)[-1]
            if base in wanted and member.isfile():
                wanted.discard(base)
                f = tar.extractfile(member)
                assert f is not None  # regular files always have a file object
                yield base, f.read()


def _members_from_folder(folder: Path, layout: CifarLayout) -> Iterator[tuple[str, bytes]]:
    for member in layout.members:
        if (folder / member).is_file():
            yield member, (folder / member).read_bytes()


def read_cifar(name: str, path: str | os.PathLike) -> tuple[dict[str, SplitArrays], list[str]]:
    """Read CIFAR ``name`` ("cifar10" or "cifar100", fine labels) from an archive or folder
    (as returned by :func:`resolve_cifar_source`). Returns ({"train", "test"}, class names)."""
    layout = LAYOUTS[name]
    path = Path(path)
    from_archive = path.is_file()
    members = _members_from_archive if from_archive else _members_from_folder
    batches: dict[str, SplitArrays] = {}
    class_names: list[str] | None = None
    bar = progress(total=len(layout.members), desc=f"reading {path.name}", unit="file")
    try:
        with bar:
            for member, raw in members(path, layout):
                where = f"{path}:{member}" if from_archive else str(path / member)
                obj = unpickle_restricted(raw, where)
                if member == layout.meta_member:
                    class_names = meta_to_class_names(obj, where, layout)
                else:
                    batches[member] = batch_to_split(obj, where, layout)
                bar.update(1)
    except DataError:
        raise
    except PermissionError as e:
        raise DataError(f"{e.filename or path}: cannot read ({e.strerror}); check the file's permissions") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({one_line(e)}); the file is truncated or corrupt") from None
    found = set(batches) | ({layout.meta_member} if class_names is not None else set())
    missing = [m for m in layout.members if m not in found]
    if missing:
        hint = " (is the archive complete?)" if from_archive else ""
        raise DataError(f"{path}: missing {name} file(s): {', '.join(missing)}{hint}")
    assert class_names is not None
    splits = {
        "train": _concat([batches[m] for m in layout.train_members]),
        "test": _concat([batches[m] for m in layout.test_members]),
    }
    return splits, class_names


def _concat(parts: list[SplitArrays]) -> SplitArrays:
    if len(parts) == 1:
        return parts[0]
    return SplitArrays(np.concatenate([p.images for p in parts]),
                       np.concatenate([p.labels for p in parts]))
