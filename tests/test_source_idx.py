"""IDX sources (fashion-mnist, mnist): parsing, locating, offline errors and downloading."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from onepoch.data import sources
from onepoch.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx_images, read_idx_labels
from onepoch.data.sources import load_source
from onepoch.errors import DataError


def where_from(request: dict) -> dict:
    """The dataset and resolved source of a request (without the file stamps)."""
    return {k: request[k] for k in ("dataset", "source")}

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True)
def no_system_copy(tmp_path, monkeypatch):
    """No Debian copy of the files unless a test says so."""
    empty = tmp_path / "no-system-copy"
    empty.mkdir()
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": empty, "mnist": empty})


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_file(path: Path, payload: bytes, gz: bool) -> Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def make_idx_dir(directory: Path, *, gz: bool, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict:
    """Write the four IDX files of a tiny 28x28 dataset; returns the arrays written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for key, array in arrays.items():
        magic = IMAGES_MAGIC if key.endswith("images") else LABELS_MAGIC
        write_file(directory / (STEMS[key] + (".gz" if gz else "")), idx_bytes(array, magic), gz)
    return arrays


def test_fashion_mnist_from_debian_directory(monkeypatch):
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": DEBIAN_FASHION_MNIST})
    monkeypatch.setenv("ONEPOCH_OFFLINE", "1")
    data = load_source("fashion-mnist")
    train, test = data.splits["train"], data.splits["test"]
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28, 1)
    assert train.labels.dtype == np.int64 and test.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert sorted(np.unique(test.labels).tolist()) == list(range(10))
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    assert data.source == str(DEBIAN_FASHION_MNIST)
    assert where_from(data.request) == {"dataset": "fashion-mnist", "source": str(DEBIAN_FASHION_MNIST)}
    assert 50 < train.images.mean() < 100  # real clothing images, not zeros


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_generated_idx_files_round_trip(tmp_path, gz):
    arrays = make_idx_dir(tmp_path / "mnist", gz=gz)
    data = load_source("mnist", tmp_path / "mnist")
    assert np.array_equal(data.splits["train"].images, arrays["train_images"][..., None])
    assert np.array_equal(data.splits["train"].labels, arrays["train_labels"])
    assert np.array_equal(data.splits["test"].images, arrays["test_images"][..., None])
    assert np.array_equal(data.splits["test"].labels, arrays["test_labels"])
    assert data.splits["train"].labels.dtype == np.int64
    assert data.class_names == [str(d) for d in range(10)]
    assert where_from(data.request) == {"dataset": "mnist", "source": str((tmp_path / "mnist").resolve())}
    assert sorted(data.request["files"]) == sorted(f"{s}.gz" if gz else s for s in STEMS.values())


def test_gzip_is_detected_by_content_not_name(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_file(tmp_path / "images-no-gz-suffix", idx_bytes(images, IMAGES_MAGIC), gz=True)
    assert np.array_equal(read_idx_images(path), images[..., None])


def test_wrong_magic_is_rejected(tmp_path):
    labels = np.zeros(5, np.uint8)
    path = write_file(tmp_path / "train-images-idx3-ubyte", idx_bytes(labels, LABELS_MAGIC), gz=False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: not an IDX images file \(magic 0x00000801, expected 0x00000803\)"):
        read_idx_images(path)


def test_truncated_gzip_is_a_data_error(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    whole = gzip.compress(idx_bytes(images, IMAGES_MAGIC))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read .*truncated or corrupt"):
        read_idx_images(path)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_payload_too_short_or_too_long(tmp_path, gz):
    images = np.ones((3, 28, 28), np.uint8)
    full = idx_bytes(images, IMAGES_MAGIC)
    short = write_file(tmp_path / "short", full[:-10], gz)
    with pytest.raises(DataError, match=r"short: truncated IDX data \(2342 of 2352 bytes"):
        read_idx_images(short)
    long = write_file(tmp_path / "long", full + b"\0", gz)
    with pytest.raises(DataError, match=r"long: IDX file is longer than its header says"):
        read_idx_images(long)
    header_only = write_file(tmp_path / "header", full[:6], gz)
    with pytest.raises(DataError, match=r"header: truncated IDX header"):
        read_idx_images(header_only)


def test_label_out_of_range(tmp_path):
    path = write_file(tmp_path / "labels", idx_bytes(np.array([0, 3, 10], np.uint8), LABELS_MAGIC), gz=False)
    with pytest.raises(DataError, match=r"labels: label 10 is out of range \(expected 0\.\.9\)"):
        read_idx_labels(path, 10)


def test_label_count_must_match_image_count(tmp_path):
    make_idx_dir(tmp_path / "d", gz=True, n_train=5)
    write_file(tmp_path / "d" / "train-labels-idx1-ubyte.gz",
               idx_bytes(np.zeros(4, np.uint8), LABELS_MAGIC), gz=True)
    with pytest.raises(DataError, match=r"has 5 images but .*train-labels-idx1-ubyte\.gz has 4 labels"):
        load_source("mnist", tmp_path / "d")


def test_missing_file_in_source_directory(tmp_path):
    make_idx_dir(tmp_path / "d", gz=False)
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing fashion-mnist file\(s\) t10k-labels-idx1-ubyte \(plain or \.gz\)"):
        load_source("fashion-mnist", tmp_path / "d")


def test_source_that_is_not_a_directory(tmp_path):
    with pytest.raises(DataError, match=r"nowhere is not a directory"):
        load_source("mnist", tmp_path / "nowhere")


def test_offline_with_nothing_found_explains_how_to_get_the_files(monkeypatch):
    monkeypatch.setenv("ONEPOCH_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_source("fashion-mnist")
    message = str(info.value)
    assert "\n" not in message
    assert "ONEPOCH_OFFLINE=1" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--source DIR" in message
    assert sources.IDX_BASE_URLS["fashion-mnist"][0] in message


def test_download_false_also_refuses_to_download():
    with pytest.raises(DataError, match=r"mnist: files not found in .* downloading is disabled; .*--source DIR"):
        load_source("mnist", download=False)


def pin_hashes(monkeypatch, name: str, directory: Path) -> None:
    """Make the .gz files in ``directory`` the official ones of ``name`` (their sha256 pinned)."""
    from onepoch.data.checksum import sha256_file

    monkeypatch.setitem(sources.IDX_SHA256, name, {s: sha256_file(directory / f"{s}.gz") for s in STEMS.values()})


def test_files_already_in_the_cache_are_used_offline(tmp_path, monkeypatch):
    arrays = make_idx_dir(tmp_path / "cache" / "downloads" / "mnist", gz=True)
    pin_hashes(monkeypatch, "mnist", tmp_path / "cache" / "downloads" / "mnist")
    monkeypatch.setenv("ONEPOCH_OFFLINE", "1")
    data = load_source("mnist")
    assert np.array_equal(data.splits["test"].labels, arrays["test_labels"])
    assert data.source == str(tmp_path / "cache" / "downloads" / "mnist")


def test_download_from_a_local_server_end_to_end(tmp_path, monkeypatch, http_server):
    root, base, requested = http_server.root, http_server.url, http_server.requested
    arrays = make_idx_dir(root / "mnist", gz=True)
    pin_hashes(monkeypatch, "mnist", root / "mnist")
    # the first mirror answers 404, so the second one must be used
    monkeypatch.setitem(sources.IDX_BASE_URLS, "mnist", (f"{base}/gone/", f"{base}/mnist/"))
    data = load_source("mnist")
    cache = tmp_path / "cache" / "downloads" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(s + ".gz" for s in STEMS.values())
    assert np.array_equal(data.splits["train"].images, arrays["train_images"][..., None])
    assert np.array_equal(data.splits["test"].labels, arrays["test_labels"])
    assert data.source == str(cache)
    # after the first file, the mirror that worked is tried first
    assert requested == ["/gone/train-images-idx3-ubyte.gz"] + [f"/mnist/{s}.gz" for s in STEMS.values()]

    # the cached copy is used from now on, with downloads disabled
    monkeypatch.setenv("ONEPOCH_OFFLINE", "1")
    again = load_source("mnist")
    assert np.array_equal(again.splits["train"].labels, arrays["train_labels"])


def test_download_failure_names_the_url_and_leaves_no_partial_file(tmp_path, monkeypatch, http_server):
    base = http_server.url
    monkeypatch.setitem(sources.IDX_BASE_URLS, "fashion-mnist", (f"{base}/missing/",))
    with pytest.raises(DataError) as info:
        load_source("fashion-mnist")
    message = str(info.value)
    assert f"download of {base}/missing/train-images-idx3-ubyte.gz failed: HTTP 404" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--source DIR" in message
    cache = tmp_path / "cache" / "downloads" / "fashion-mnist"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_a_download_with_another_sha256_is_discarded(tmp_path, monkeypatch, http_server):
    root, base = http_server.root, http_server.url
    (root / "html").mkdir()
    for stem in STEMS.values():
        (root / "html" / f"{stem}.gz").write_text("<html>not here</html>")
    monkeypatch.setitem(sources.IDX_BASE_URLS, "mnist", (f"{base}/html/",))
    with pytest.raises(DataError, match=r"html/train-images-idx3-ubyte\.gz failed: its sha256 \w+ is not the "
                                        r"pinned 440fcabf.*the file was deleted"):
        load_source("mnist")
    assert list((tmp_path / "cache" / "downloads" / "mnist").iterdir()) == []


def test_size_and_grayscale_may_only_restate_the_native_format(tmp_path):
    make_idx_dir(tmp_path / "d", gz=True)
    data = load_source("mnist", tmp_path / "d", size=28, grayscale=True)
    assert data.splits["train"].images.shape == (6, 28, 28, 1)
    with pytest.raises(DataError, match=r"images are 28x28 and cannot be resized \(--size 32\)"):
        load_source("mnist", tmp_path / "d", size=32)
    with pytest.raises(DataError, match=r"test folder or test fraction applies only to folder sources"):
        load_source("mnist", tmp_path / "d", test_fraction=0.1)
