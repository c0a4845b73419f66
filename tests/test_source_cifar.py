"""CIFAR-10 / CIFAR-100 sources: fake archives and folders, restricted unpickling, corrupt input."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from onepoch.data import cifar
from onepoch.data.sources import load_source
from onepoch.errors import DataError


def where_from(request: dict) -> dict:
    """The dataset and resolved source of a request (without the file stamps)."""
    return {k: request[k] for k in ("dataset", "source")}


class Py2StylePickler(pickle._Pickler):
    """Writes bytes and str the way Python 2's cPickle wrote ``str`` (BINSTRING opcodes), as in
    the real CIFAR files (so e.g. numpy's dtype arguments load as b"u1"); Python 3's own
    protocol-2 output would call ``_codecs.encode`` for bytes instead."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj, numpy_module: str = "numpy.core.multiarray") -> bytes:
    """Protocol-2 pickle of ``obj`` like the official files (which name numpy.core.multiarray)."""
    buffer = io.BytesIO()
    Py2StylePickler(buffer, protocol=2).dump(obj)
    data = buffer.getvalue()
    return data.replace(b"cnumpy._core.multiarray\n", f"c{numpy_module}\n".encode())


def planar_rows(images: np.ndarray) -> np.ndarray:
    """NHWC images -> CIFAR's (n, 3072) rows of R, G and B planes."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def fake_cifar(name: str, per_batch: int = 2, seed: int = 0, numpy_module: str = "numpy.core.multiarray"):
    """(members {name: pickle bytes}, expected train SplitArrays-like dict, test, class names)."""
    layout = cifar.LAYOUTS[name]
    rng = np.random.default_rng(seed)
    members, expected = {}, {"train": ([], []), "test": ([], [])}
    for split, names in (("train", layout.train_members), ("test", layout.test_members)):
        for member in names:
            images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, layout.num_classes, per_batch).tolist()
            batch = {b"batch_label": b"fake " + member.encode(), b"data": planar_rows(images),
                     layout.labels_key.encode(): labels, b"filenames": [b"x.png"] * per_batch}
            if name == "cifar100":
                batch[b"coarse_labels"] = [0] * per_batch
            members[member] = py2_pickle(batch, numpy_module)
            expected[split][0].append(images)
            expected[split][1].append(labels)
    class_names = [f"class {i}" for i in range(layout.num_classes)]
    members[layout.meta_member] = py2_pickle({layout.names_key.encode(): [n.encode() for n in class_names]})
    arrays = {s: (np.concatenate(x), np.concatenate(y)) for s, (x, y) in expected.items()}
    return members, arrays, class_names


def write_archive(path: Path, folder: str, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for member, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_folder(path: Path, members: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    for member, data in members.items():
        (path / member).write_bytes(data)
    return path


def assert_matches(data, arrays, class_names):
    for split in ("train", "test"):
        images, labels = arrays[split]
        assert data.splits[split].images.shape == (len(images), 32, 32, 3)
        assert np.array_equal(data.splits[split].images, images)
        assert np.array_equal(data.splits[split].labels, labels)
        assert data.splits[split].labels.dtype == np.int64
    assert data.class_names == class_names


@pytest.mark.parametrize("form", ["archive", "dir-with-archive", "folder", "dir-with-folder"])
def test_cifar10_from_archive_or_folder(tmp_path, form):
    members, arrays, class_names = fake_cifar("cifar10")
    layout = cifar.LAYOUTS["cifar10"]
    if form.endswith("archive"):
        (tmp_path / "src").mkdir()
        target = write_archive(tmp_path / "src" / layout.archive, layout.folder, members)
        source = target if form == "archive" else tmp_path / "src"
    else:
        target = write_folder(tmp_path / "src" / layout.folder, members)
        source = target if form == "folder" else tmp_path / "src"
    data = load_source("cifar10", source)
    assert_matches(data, arrays, class_names)
    assert arrays["train"][0].shape[0] == 10 and arrays["test"][0].shape[0] == 2
    assert data.source == str(target.resolve())
    assert where_from(data.request) == {"dataset": "cifar10", "source": str(target.resolve())}


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_cifar100_uses_fine_labels(tmp_path, numpy_module):
    members, arrays, class_names = fake_cifar("cifar100", per_batch=3, numpy_module=numpy_module)
    layout = cifar.LAYOUTS["cifar100"]
    archive = write_archive(tmp_path / layout.archive, layout.folder, members)
    data = load_source("cifar100", archive)
    assert_matches(data, arrays, class_names)
    assert len(data.class_names) == 100
    folder = write_folder(tmp_path / "x" / layout.folder, members)
    assert_matches(load_source("cifar100", folder), arrays, class_names)


def test_archive_in_download_cache_is_used_offline(tmp_path, monkeypatch):
    members, arrays, class_names = fake_cifar("cifar10")
    layout = cifar.LAYOUTS["cifar10"]
    cache = tmp_path / "cache" / "downloads" / "cifar10"
    cache.mkdir(parents=True)
    write_archive(cache / layout.archive, layout.folder, members)
    from onepoch.data import sources
    from onepoch.data.checksum import sha256_file

    monkeypatch.setitem(sources.CIFAR_SHA256, "cifar10", sha256_file(cache / layout.archive))  # as if official
    monkeypatch.setenv("ONEPOCH_OFFLINE", "1")
    assert_matches(load_source("cifar10"), arrays, class_names)


def test_offline_without_archive_explains_how_to_get_it(monkeypatch):
    monkeypatch.setenv("ONEPOCH_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cifar100: cifar-100-python\.tar\.gz not found .*"
                                        r"https://www\.cs\.toronto\.edu/~kriz/cifar-100-python\.tar\.gz .*--source"):
        load_source("cifar100")


class CreatesFile:
    """Unpickling this calls open(path, "w"), creating the file: a stand-in for arbitrary code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    layout = cifar.LAYOUTS["cifar10"]
    members, _, _ = fake_cifar("cifar10")
    marker = tmp_path / "pwned"
    members["data_batch_3"] = py2_pickle(
        {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": CreatesFile(marker)})
    archive = write_archive(tmp_path / layout.archive, layout.folder, members)

    # the payload really works: plain pickle would create the file
    proof = tmp_path / "proof"
    pickle.loads(py2_pickle(CreatesFile(proof)), encoding="latin-1").close()
    assert proof.exists()

    # the global is io.open on Python 3.11 and _io.open on 3.12: either way it must be refused
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz:data_batch_3: refusing to unpickle _?io\.open "):
        load_source("cifar10", archive)
    assert not marker.exists()


def test_global_os_system_is_refused(tmp_path):
    marker = tmp_path / "ran"
    payload = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    with pytest.raises(DataError, match=r"batch: refusing to unpickle os\.system"):
        cifar.unpickle_restricted(payload, "batch")
    assert not marker.exists()


def test_truncated_archive_is_a_data_error(tmp_path):
    layout = cifar.LAYOUTS["cifar10"]
    members, _, _ = fake_cifar("cifar10", per_batch=20)
    archive = write_archive(tmp_path / layout.archive, layout.folder, members)
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: cannot read .*truncated or corrupt"):
        load_source("cifar10", archive)


def test_not_an_archive_is_a_data_error(tmp_path):
    bogus = tmp_path / "cifar-10-python.tar.gz"
    bogus.write_bytes(b"this is not a tar file at all" * 20)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: cannot read"):
        load_source("cifar10", bogus)


def test_missing_member_is_named(tmp_path):
    layout = cifar.LAYOUTS["cifar10"]
    members, _, _ = fake_cifar("cifar10")
    del members["test_batch"]
    archive = write_archive(tmp_path / layout.archive, layout.folder, members)
    with pytest.raises(DataError, match=r"missing cifar10 file\(s\): test_batch"):
        load_source("cifar10", archive)


def test_directory_without_cifar_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: contains neither cifar-10-python\.tar\.gz nor a cifar-10-batches-py/ folder"):
        load_source("cifar10", tmp_path / "empty")


@pytest.mark.parametrize("batch, message", [
    ([1, 2], r"expected a dict, found list"),
    ({b"labels": [0]}, r"not a cifar10 batch \(missing key 'data'\)"),
    ({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}, r"'data' must be uint8 \(n, 3072\), found uint8 \(1, 100\)"),
    ({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}, r"'data' must be uint8"),
    ({b"data": np.array([[b"x"] * 3072], dtype=object), b"labels": [0]}, r"'data' is an object array \(refused\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"expected 2 integer labels"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, r"labels must lie in 0\.\.9, found 10\.\.10"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [b"cat"]}, r"labels must all be integers"),
])
def test_malformed_batches_are_rejected(tmp_path, batch, message):
    layout = cifar.LAYOUTS["cifar10"]
    members, _, _ = fake_cifar("cifar10")
    members["data_batch_2"] = py2_pickle(batch)
    folder = write_folder(tmp_path / layout.folder, members)
    with pytest.raises(DataError, match=r"data_batch_2: " + message):
        load_source("cifar10", folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_member_is_not_a_valid_pickle(tmp_path, damage):
    layout = cifar.LAYOUTS["cifar10"]
    members, _, _ = fake_cifar("cifar10")
    meta = members["batches.meta"]
    members["batches.meta"] = meta[: len(meta) // 2] if damage == "truncate" else b"\xff" * 64
    folder = write_folder(tmp_path / layout.folder, members)
    with pytest.raises(DataError, match=r"batches\.meta: not a valid pickle \(") as info:
        load_source("cifar10", folder)
    assert "\n" not in str(info.value)


def test_size_must_be_native_for_cifar(tmp_path):
    layout = cifar.LAYOUTS["cifar10"]
    members, _, _ = fake_cifar("cifar10")
    folder = write_folder(tmp_path / layout.folder, members)
    assert load_source("cifar10", folder, size=32).splits["test"].images.shape == (2, 32, 32, 3)
    with pytest.raises(DataError, match=r"cannot be resized \(--size 64\)"):
        load_source("cifar10", folder, size=64)
    with pytest.raises(DataError, match=r"images are RGB; grayscale conversion applies only to folder"):
        load_source("cifar10", folder, grayscale=True)
