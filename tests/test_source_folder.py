"""Image-folder sources: listing rules, resize + center crop, stratified and folder test splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onepoch.data.folder import stratified_split
from onepoch.data.sources import load_source
from onepoch.errors import DataError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(path: Path, size: tuple[int, int], color: tuple[int, int, int], fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def make_folder(root: Path) -> Path:
    """cat: 5 red images, dog: 3 blue images; PNG and JPEG of different sizes, plus hidden junk."""
    for i, (size, ext) in enumerate([((40, 30), "png"), ((20, 50), "jpg"), ((64, 64), "PNG"),
                                      ((33, 17), "jpeg"), ((16, 16), "JPG")]):
        solid(root / "cat" / f"c{i}.{ext}", size, RED, "PNG" if ext.lower() == "png" else "JPEG")
    for i, size in enumerate([(50, 40), (12, 80), (30, 30)]):
        solid(root / "dog" / f"d{i}.png", size, BLUE)
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "cat" / ".hidden.txt").write_text("ignored")
    (root / ".cache").mkdir()
    return root


def test_folder_happy_path_with_stratified_split(tmp_path):
    root = make_folder(tmp_path / "pets")
    data = load_source("folder", root, size=8)
    train, test = data.splits["train"], data.splits["test"]
    assert data.class_names == ["cat", "dog"]
    # cat: round(5 * 0.2) = 1 test image; dog: round(3 * 0.2) = 1 (at least one), 2 stay in train
    assert train.images.shape == (6, 8, 8, 3) and test.images.shape == (2, 8, 8, 3)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == [4, 2]
    assert np.bincount(test.labels).tolist() == [1, 1]
    for split in (train, test):
        for image, label in zip(split.images, split.labels):
            expected = np.array(RED if label == 0 else BLUE)
            assert np.abs(image.astype(int) - expected).max() <= 3  # JPEG is close, PNG exact
    assert data.source == str(root.resolve())
    files = data.request.pop("files")             # every visible image's name, size, mtime: 5 cats, 3 dogs
    assert files["files"] == 8 and len(files["sha256"]) == 64
    assert data.request == {"dataset": "folder", "source": str(root.resolve()), "size": 8,
                            "grayscale": False, "test_fraction": 0.2, "seed": 0}


def test_split_is_seeded(tmp_path):
    root = tmp_path / "many"
    for c in range(3):
        for i in range(10):
            solid(root / f"k{c}" / f"{i:02d}.png", (4, 4), (c * 100, i * 20, 0))
    a = load_source("folder", root, size=4, seed=7, test_fraction=0.3)
    b = load_source("folder", root, size=4, seed=7, test_fraction=0.3)
    assert np.array_equal(a.splits["test"].images, b.splits["test"].images)
    assert np.bincount(a.splits["test"].labels).tolist() == [3, 3, 3]
    # the green channel identifies the image; test images are disjoint from train images
    train_ids = {(int(y), int(im[0, 0, 1])) for im, y in zip(a.splits["train"].images, a.splits["train"].labels)}
    test_ids = {(int(y), int(im[0, 0, 1])) for im, y in zip(a.splits["test"].images, a.splits["test"].labels)}
    assert len(train_ids) == 21 and len(test_ids) == 9 and not train_ids & test_ids
    seeds = {tuple(load_source("folder", root, size=4, seed=s).splits["test"].images[:, 0, 0, 1]) for s in range(4)}
    assert len(seeds) > 1


def test_stratified_split_rule():
    labels = np.array([0] + [1] * 2 + [2] * 10 + [3] * 7)
    train, test = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[test], minlength=4).tolist() == [0, 1, 2, 1]  # 7 * 0.2 = 1.4 -> 1
    assert np.bincount(labels[train], minlength=4).tolist() == [1, 1, 8, 6]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(labels.size))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    _, mostly_test = stratified_split(labels, 0.99, seed=0)
    assert np.bincount(labels[mostly_test], minlength=4).tolist() == [0, 1, 9, 6]  # >= 1 train each
    with pytest.raises(DataError, match=r"test fraction must be between 0 and 1"):
        stratified_split(labels, 1.0, seed=0)


def test_resize_shorter_side_then_center_crop(tmp_path):
    """A 20x60 (red|green|blue rows) and a 90x30 (red|green|red columns) image: the shorter side
    goes to 10 and the 10x10 center crop is the middle, green third."""
    (tmp_path / "src" / "tall").mkdir(parents=True)
    (tmp_path / "src" / "wide").mkdir(parents=True)
    tall = Image.new("RGB", (20, 60), RED)
    tall.paste(Image.new("RGB", (20, 20), GREEN), (0, 20))
    tall.paste(Image.new("RGB", (20, 20), BLUE), (0, 40))
    tall.save(tmp_path / "src" / "tall" / "a.png")
    wide = Image.new("RGB", (90, 30), RED)
    wide.paste(Image.new("RGB", (30, 30), GREEN), (30, 0))
    wide.save(tmp_path / "src" / "wide" / "a.png")
    tests = tmp_path / "test"
    solid(tests / "tall" / "t.png", (10, 10), GREEN)
    solid(tests / "wide" / "w.png", (10, 10), GREEN)
    data = load_source("folder", tmp_path / "src", size=10, test_source=tests)
    assert data.splits["train"].images.shape == (2, 10, 10, 3)
    for image in data.splits["train"].images:
        assert np.abs(image[1:-1, 1:-1].astype(int) - np.array(GREEN)).max() <= 8


def test_grayscale(tmp_path):
    root = make_folder(tmp_path / "pets")
    data = load_source("folder", root, size=6, grayscale=True)
    assert data.splits["train"].images.shape == (6, 6, 6, 1)
    red_luma = round(255 * 299 / 1000)
    cat = data.splits["train"].images[data.splits["train"].labels == 0]
    assert np.abs(cat.astype(int) - red_luma).max() <= 3
    assert data.request["grayscale"] is True


def test_test_source_folder(tmp_path):
    root = make_folder(tmp_path / "train")
    solid(tmp_path / "test" / "cat" / "x.png", (9, 9), RED)
    solid(tmp_path / "test" / "dog" / "y.jpg", (9, 12), BLUE)
    solid(tmp_path / "test" / "dog" / "z.png", (9, 12), BLUE)
    data = load_source("folder", root, size=8, test_source=tmp_path / "test")
    assert data.splits["train"].images.shape == (8, 8, 8, 3)
    assert data.splits["test"].labels.tolist() == [0, 1, 1]
    assert data.request.pop("files")["files"] == 8 and data.request.pop("test_files")["files"] == 3
    assert data.request == {"dataset": "folder", "source": str(root.resolve()), "size": 8,
                            "grayscale": False, "test_source": str((tmp_path / "test").resolve())}


def test_test_source_with_other_classes(tmp_path):
    root = make_folder(tmp_path / "train")
    solid(tmp_path / "test" / "cat" / "x.png", (9, 9), RED)
    solid(tmp_path / "test" / "bird" / "y.png", (9, 9), RED)
    with pytest.raises(DataError, match=r"different class folders .*only in train: \['dog'\]; only in test: \['bird'\]"):
        load_source("folder", root, size=8, test_source=tmp_path / "test")


def test_size_is_required(tmp_path):
    root = make_folder(tmp_path / "pets")
    with pytest.raises(DataError, match=r"needs a target image size \(--size N\)"):
        load_source("folder", root)
    with pytest.raises(DataError, match=r"positive integer"):
        load_source("folder", root, size=0)


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty is empty \(expected one subfolder per class\)"):
        load_source("folder", tmp_path / "empty", size=8)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope does not exist or is not a directory"):
        load_source("folder", tmp_path / "nope", size=8)


def test_class_folder_without_images(tmp_path):
    root = make_folder(tmp_path / "pets")
    (root / "fish").mkdir()
    (root / "fish" / ".keep").write_text("")
    with pytest.raises(DataError, match=r"fish: class folder contains no images"):
        load_source("folder", root, size=8)


def test_non_image_file(tmp_path):
    root = make_folder(tmp_path / "pets")
    (root / "dog" / "notes.txt").write_text("good dog")
    with pytest.raises(DataError, match=r"dog/notes\.txt: not an image file \(expected \.png, \.jpg, \.jpeg\)"):
        load_source("folder", root, size=8)


def test_corrupt_png(tmp_path):
    root = make_folder(tmp_path / "pets")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"cat/broken\.png: cannot decode image") as info:
        load_source("folder", root, size=8, test_fraction=0.5)
    assert "\n" not in str(info.value)


def test_truncated_jpeg(tmp_path):
    root = make_folder(tmp_path / "pets")
    good = (root / "cat" / "c1.jpg").read_bytes()
    (root / "cat" / "c1.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cat/c1\.jpg: cannot decode image"):
        load_source("folder", root, size=8)


def test_loose_file_in_root(tmp_path):
    root = make_folder(tmp_path / "pets")
    solid(root / "stray.png", (8, 8), RED)
    with pytest.raises(DataError, match=r"stray\.png: file in the root of an image folder"):
        load_source("folder", root, size=8)


def test_nested_directory_in_class_folder(tmp_path):
    root = make_folder(tmp_path / "pets")
    solid(root / "cat" / "more" / "x.png", (8, 8), RED)
    with pytest.raises(DataError, match=r"cat/more: unexpected directory inside a class folder"):
        load_source("folder", root, size=8)


def test_single_image_classes_cannot_make_a_test_split(tmp_path):
    solid(tmp_path / "one" / "a" / "x.png", (8, 8), RED)
    solid(tmp_path / "one" / "b" / "y.png", (8, 8), BLUE)
    with pytest.raises(DataError, match=r"too few images for a test split"):
        load_source("folder", tmp_path / "one", size=8)
    with pytest.raises(DataError, match=r"either a test folder or a test fraction, not both"):
        load_source("folder", tmp_path / "one", size=8, test_source=tmp_path / "one", test_fraction=0.5)


def test_exif_orientation_is_applied(tmp_path):
    # a 20 wide x 10 tall picture stored sideways: EXIF orientation 6 = rotate 90 degrees clockwise
    raw = np.zeros((10, 20, 3), np.uint8)
    raw[:, :, 0] = np.arange(20, dtype=np.uint8)[None, :] * 12  # red grows left to right
    raw[:, :, 1] = np.arange(10, dtype=np.uint8)[:, None] * 25  # green grows top to bottom
    exif = Image.Exif()
    exif[0x0112] = 6
    for cls in ("a", "b"):
        for i in range(2):
            path = tmp_path / "src" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(raw).save(path, exif=exif)
    data = load_source("folder", tmp_path / "src", size=10, test_fraction=0.5)
    upright = np.rot90(raw, k=-1)  # 20 tall x 10 wide
    np.testing.assert_array_equal(data.splits["train"].images[0], upright[5:15])


def _prepare(capsys, *argv) -> tuple[int, str, str]:
    from onepoch.cli import main

    code = main(["prepare", "folder", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("change", ["added", "rewritten"])
def test_prepare_raw_folder_again_notices_a_changed_source(tmp_path, capsys, change):
    """Issue 29: a raw-layout folder prepared again after an image was added (or rewritten with
    another size) is not 'nothing to do': the old dataset is kept and --force is asked for."""
    root, out = make_folder(tmp_path / "pets"), tmp_path / "prepared"
    args = ("--source", root, "--size", "8", "--out", out)
    assert _prepare(capsys, *args)[0] == 0
    code, stdout, _ = _prepare(capsys, *args)
    assert code == 0 and "nothing to do" in stdout                  # unchanged: nothing to do
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    if change == "added":
        solid(root / "dog" / "d9.png", (20, 20), BLUE)
    else:
        solid(root / "cat" / "c0.png", (41, 30), RED, "PNG")
    code, stdout, err = _prepare(capsys, *args)
    assert code == 2 and "nothing to do" not in stdout, stdout
    assert err.startswith("onepoch: error: ") and len(err.strip().splitlines()) == 1, err
    assert f"--out {out} already holds another prepared dataset" in err and "--force" in err
    assert "the source files changed" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _prepare(capsys, *args, "--force")[0] == 0
    from onepoch.data import open_split

    counts = {"added": 9, "rewritten": 8}[change]
    assert open_split(out, "train").num_images + open_split(out, "test").num_images == counts


@pytest.mark.parametrize("layout", ["raw", "jpeg"])
def test_class_folder_names_that_are_not_utf8_are_kept_readable(tmp_path, capsys, layout):
    """Issue 29: a class folder named with Latin-1 bytes (b'caf\\xe9') prepares in both layouts; its
    class name is written with the byte escaped ('caf\\\\xe9'), so JSON, report and plots can show it."""
    import os

    root = make_folder(tmp_path / "pets")
    os.rename(root / "dog", os.path.join(os.fsencode(root), b"caf\xe9"))
    out = tmp_path / "prepared"
    code, _, err = _prepare(capsys, "--source", root, "--out", out, "--layout", layout,
                            *(["--size", "8"] if layout == "raw" else []))
    assert code == 0, err
    from onepoch.data import open_split

    names = open_split(out, "train").class_names
    assert names == ["caf\\xe9", "cat"]
    assert (out / "dataset.json").read_bytes().decode("utf-8")        # valid UTF-8, no lone surrogate
    code, stdout, _ = _prepare(capsys, "--source", root, "--out", out, "--layout", layout,
                               *(["--size", "8"] if layout == "raw" else []))
    assert code == 0 and "nothing to do" in stdout
