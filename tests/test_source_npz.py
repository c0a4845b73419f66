"""npz sources: the arrays layout and the JPEG-bytes layout, and malformed files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onepoch.data.sources import load_source
from onepoch.errors import DataError


def where_from(request: dict) -> dict:
    """The dataset and resolved source of a request (without the file stamps)."""
    return {k: request[k] for k in ("dataset", "source")}


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def jpeg_split(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """(concatenated bytes, offsets, the individual files) for a list of HWC images."""
    files = [jpeg_bytes(im) for im in images]
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
    return np.frombuffer(b"".join(files), np.uint8), offsets, files


def jpeg_arrays(n_train: int = 5, n_test: int = 3, size: tuple[int, int] = (8, 8)) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]
        arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"], _ = jpeg_split(images)
    arrays["y_train"] = np.array([0, 1, 2, 1, 0][:n_train], np.uint8)
    arrays["y_test"] = np.array([4, 0, 1][:n_test], np.uint8)
    return arrays


def save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_arrays_layout_nhwc(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    path = save(tmp_path / "d.npz", x_train=x_train, y_train=np.array([0, 1, 2, 0, 1, 2]),
                x_test=x_test, y_test=np.array([2, 0]), class_names=np.array(["a", "b", "c"]))
    data = load_source("npz", path)
    assert np.array_equal(data.splits["train"].images, x_train)
    assert np.array_equal(data.splits["test"].images, x_test)
    assert data.splits["train"].labels.dtype == np.int64
    assert data.splits["test"].labels.tolist() == [2, 0]
    assert data.class_names == ["a", "b", "c"]
    assert where_from(data.request) == {"dataset": "npz", "source": str(path.resolve())}


def test_arrays_layout_nhw_gets_a_channel_axis(tmp_path):
    x_train = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    path = save(tmp_path / "gray.npz", x_train=x_train, y_train=np.array([0, 1, 0, 3]),
                x_test=x_train[:1], y_test=np.array([1]))
    data = load_source("npz", path, grayscale=True, size=3)
    assert data.splits["train"].images.shape == (4, 3, 3, 1)
    assert np.array_equal(data.splits["train"].images[..., 0], x_train)
    assert data.class_names == ["0", "1", "2", "3"]


def test_jpeg_layout(tmp_path):
    arrays = jpeg_arrays()
    path = save(tmp_path / "j.npz", **arrays)
    data = load_source("npz", path)
    for split in ("train", "test"):
        blob, offsets = arrays[f"{split}_jpeg"].tobytes(), arrays[f"{split}_offsets"]
        expected = np.stack([decoded(blob[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
        assert data.splits[split].images.shape == (len(offsets) - 1, 8, 8, 3)
        assert np.array_equal(data.splits[split].images, expected)
        assert np.array_equal(data.splits[split].labels, arrays[f"y_{split}"])
    # no class_names: K = max label over both splits + 1 = 5 (label 4 only occurs in test)
    assert data.class_names == ["0", "1", "2", "3", "4"]


def test_jpeg_layout_grayscale_and_class_names(tmp_path):
    images = [np.full((6, 7), v, np.uint8) for v in (10, 200, 90)]
    blob, offsets, _ = jpeg_split(images)
    path = save(tmp_path / "g.npz", train_jpeg=blob, train_offsets=offsets, y_train=np.array([0, 1, 1]),
                test_jpeg=blob, test_offsets=offsets, y_test=np.array([1, 1, 0]),
                class_names=np.array([b"dark", b"light"]))
    data = load_source("npz", path)
    assert data.splits["train"].images.shape == (3, 6, 7, 1)
    assert np.abs(data.splits["train"].images[:, :, :, 0].astype(int).mean(axis=(1, 2)) - [10, 200, 90]).max() < 2
    assert data.class_names == ["dark", "light"]


def test_missing_arrays_are_listed(tmp_path):
    arrays = jpeg_arrays()
    del arrays["test_offsets"], arrays["y_test"]
    path = save(tmp_path / "m.npz", **arrays)
    with pytest.raises(DataError, match=r"m\.npz: missing array\(s\) test_offsets, y_test for the jpeg layout"):
        load_source("npz", path)
    path = save(tmp_path / "a.npz", x_train=np.zeros((1, 2, 2), np.uint8), y_train=np.array([0]))
    with pytest.raises(DataError, match=r"a\.npz: missing array\(s\) x_test, y_test for the arrays layout"):
        load_source("npz", path)
    path = save(tmp_path / "u.npz", images=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DataError, match=r"u\.npz: unknown npz layout \(arrays found: images\)"):
        load_source("npz", path)


@pytest.mark.parametrize("change, message", [
    (lambda o, n: o[:-1], r"train_offsets has 5 entries, expected 6 \(one more than the 5 labels of y_train\)"),
    (lambda o, n: o + 1, r"train_offsets must start at 0 and end at \d+ \(the length of train_jpeg\)"),
    (lambda o, n: np.concatenate([o[:-1], [n + 7]]), r"must start at 0 and end at"),
    (lambda o, n: o[[0, 2, 1, 3, 4, 5]], r"train_offsets decreases at index 1"),
    (lambda o, n: o.astype(np.float64), r"train_offsets must be a 1-D integer array"),
])
def test_bad_offsets(tmp_path, change, message):
    arrays = jpeg_arrays()
    arrays["train_offsets"] = change(arrays["train_offsets"], arrays["train_jpeg"].size)
    path = save(tmp_path / "o.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_source("npz", path)


def test_corrupt_jpeg_names_split_and_index(tmp_path):
    arrays = jpeg_arrays()
    blob = arrays["test_jpeg"].copy()
    start, end = arrays["test_offsets"][1], arrays["test_offsets"][2]
    blob[start + 2:end] = 0  # keep the SOI marker, destroy the rest of image 1
    arrays["test_jpeg"] = blob
    path = save(tmp_path / "c.npz", **arrays)
    with pytest.raises(DataError, match=r"c\.npz: test image 1 is not a valid JPEG") as info:
        load_source("npz", path)
    assert "\n" not in str(info.value)


def test_png_bytes_are_not_accepted_as_jpeg(tmp_path):
    arrays = jpeg_arrays()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    blob, offsets = arrays["test_jpeg"].tobytes(), arrays["test_offsets"]
    parts = [blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    parts[2] = buffer.getvalue()
    arrays["test_jpeg"] = np.frombuffer(b"".join(parts), np.uint8)
    arrays["test_offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    with pytest.raises(DataError, match=r"test image 2 is not a valid JPEG"):
        load_source("npz", save(tmp_path / "p.npz", **arrays))


def test_images_of_different_sizes(tmp_path):
    arrays = jpeg_arrays()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (9, 8, 3), dtype=np.uint8)]
    arrays["test_jpeg"], arrays["test_offsets"], _ = jpeg_split(images)
    arrays["y_test"] = np.array([0, 1])
    with pytest.raises(DataError, match=r"test image 1 is 8x9, but image 0 is 8x8 \(all images must have one size\)"):
        load_source("npz", save(tmp_path / "s.npz", **arrays))


def test_grayscale_and_cmyk_jpegs_among_colour_ones_are_converted(tmp_path):
    """Like ImageNet (and the Imagenette copy, with 242 grayscale JPEGs): a grayscale and a CMYK JPEG
    among RGB ones become RGB, each pixel as Pillow's own convert("RGB") of the decoded file gives it."""
    rng = np.random.default_rng(2)
    files = [jpeg_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
             jpeg_bytes(rng.integers(0, 256, (8, 8), dtype=np.uint8))]  # mode L
    cmyk = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("CMYK").save(cmyk, format="JPEG")
    files.append(cmyk.getvalue())
    assert [Image.open(io.BytesIO(f)).mode for f in files] == ["RGB", "L", "CMYK"]
    arrays = jpeg_arrays()
    arrays["test_jpeg"] = np.frombuffer(b"".join(files), np.uint8)
    arrays["test_offsets"] = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
    source = load_source("npz", save(tmp_path / "mixed.npz", **arrays))
    test = source.splits["test"].images
    assert test.shape == (3, 8, 8, 3) and source.splits["train"].images.shape[-1] == 3
    for image, f in zip(test, files):
        assert np.array_equal(image, decoded(f))


@pytest.mark.parametrize("labels, message", [
    (np.array([0, -1, 2, 1, 0]), r"y_train has negative label -1"),
    (np.array([0.0, 1, 2, 1, 0]), r"y_train must be a 1-D integer array, found float64"),
])
def test_bad_labels(tmp_path, labels, message):
    arrays = jpeg_arrays()
    arrays["y_train"] = labels
    with pytest.raises(DataError, match=message):
        load_source("npz", save(tmp_path / "l.npz", **arrays))


def test_label_without_class_name(tmp_path):
    arrays = jpeg_arrays()
    arrays["class_names"] = np.array(["a", "b", "c"])
    with pytest.raises(DataError, match=r"label 4 has no class name \(class_names has 3 entries\)"):
        load_source("npz", save(tmp_path / "n.npz", **arrays))


def test_wrong_image_dtype_names_the_file(tmp_path):
    path = save(tmp_path / "f.npz", x_train=np.zeros((2, 3, 3), np.float32), y_train=np.array([0, 1]),
                x_test=np.zeros((1, 3, 3), np.uint8), y_test=np.array([0]))
    with pytest.raises(DataError, match=r"f\.npz: train images must be uint8, got float32"):
        load_source("npz", path)


def test_object_arrays_are_never_unpickled(tmp_path):
    path = save(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=np.array([0]),
                x_test=np.zeros((1, 2, 2), np.uint8), y_test=np.array([0]))
    with pytest.raises(DataError, match=r"obj\.npz: cannot read array 'x_train' \(Object arrays cannot be loaded"):
        load_source("npz", path)


def test_not_an_npz_file(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello, I am not a zip archive\n")
    with pytest.raises(DataError, match=r"notes\.npz: not an \.npz file \(no zip signature\)"):
        load_source("npz", text)
    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DataError, match=r"single\.npy: is a single \.npy array, not an \.npz archive"):
        load_source("npz", npy)
    with pytest.raises(DataError, match=r"npz source .*absent\.npz does not exist"):
        load_source("npz", tmp_path / "absent.npz")


def test_truncated_npz(tmp_path):
    path = save(tmp_path / "t.npz", **jpeg_arrays())
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(DataError, match=r"t\.npz: not a readable \.npz file"):
        load_source("npz", path)


def test_size_grayscale_and_split_options_are_refused_unless_native(tmp_path):
    path = save(tmp_path / "j.npz", **jpeg_arrays())
    assert load_source("npz", path, size=8).splits["train"].images.shape == (5, 8, 8, 3)
    with pytest.raises(DataError, match=r"npz: images are 8x8 and cannot be resized \(--size 16\)"):
        load_source("npz", path, size=16)
    with pytest.raises(DataError, match=r"npz: images are RGB; grayscale conversion"):
        load_source("npz", path, grayscale=True)
    with pytest.raises(DataError, match=r"applies only to folder sources"):
        load_source("npz", path, test_source=tmp_path)


@pytest.mark.parametrize("savez", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_corrupt_member_data(tmp_path, savez):
    path = tmp_path / "bad.npz"
    savez(path, **jpeg_arrays(n_train=5, n_test=3, size=(64, 64)))
    blob = bytearray(path.read_bytes())
    middle = len(blob) // 3
    blob[middle:middle + 200] = bytes(200)
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"bad\.npz: ") as info:
        load_source("npz", path)
    assert "\n" not in str(info.value)
