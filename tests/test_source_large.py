"""Large-image sources: folder --layout jpeg, imagenette, imagenet, imagenet100 (JPEG at rest), and
tiny-imagenet, stl10 (raw), on small generated data; md5-pinned downloads."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from onepoch.cli import main
from onepoch.data import download as dl
from onepoch.data import sources
from onepoch.data.checksum import file_digest
from onepoch.data.encoded import decode_image
from onepoch.data.imagenet import IMAGENET100_FILE, IMAGENETTE_NAMES, imagenet100_classes, read_class_list
from onepoch.data.prepared import open_split, read_dataset_info
from onepoch.data.sources import SOURCE_NAMES, load_source
from onepoch.data.stl10 import IMAGE_BYTES
from onepoch.errors import DataError
from test_cli import assert_one_line_error, run_cli

WNIDS = ["n01440764", "n02102040", "n02979186", "n03888257"]  # four Imagenette classes
KINDS = ("jpeg", "png", "gray", "cmyk", "palette")


# --- generated images -----------------------------------------------------------------------------


def pattern(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colour pattern (JPEG keeps it closely) that differs from seed to seed."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(1, w - 1) + 37 * seed) % 256
    g = (y * 255 // max(1, h - 1) + 91 * seed) % 256
    b = ((x + y) * 4 + 53 * seed) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def image_bytes(kind: str, h: int, w: int, seed: int) -> bytes:
    """A small image file of one kind: RGB JPEG, PNG, grayscale JPEG, CMYK JPEG or palette PNG."""
    rgb = Image.fromarray(pattern(h, w, seed))
    if kind == "jpeg":
        return encode(rgb, "JPEG", quality=90)
    if kind == "png":
        return encode(rgb, "PNG")
    if kind == "gray":
        return encode(rgb.convert("L"), "JPEG", quality=90)
    if kind == "cmyk":
        return encode(rgb.convert("CMYK"), "JPEG", quality=90)
    if kind == "palette":
        return encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")
    raise ValueError(kind)


def rotated_jpeg(h: int = 12, w: int = 20, orientation: int = 6) -> bytes:
    """A JPEG stored sideways with an EXIF orientation (6: show it rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pattern(h, w, 7)), "JPEG", quality=95, exif=exif)


def upright(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def write_class_dir(d: Path, wnid: str, n: int, start: int = 0, size=(18, 24), ext=".JPEG") -> list[Path]:
    """``n`` images of every kind in turn (the format is in the bytes; ImageNet's names all end in .JPEG)."""
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    offset = 10 * WNIDS.index(wnid) if wnid in WNIDS else 0  # classes look different
    for i in range(start, start + n):
        path = d / f"{wnid}_{i}{ext}"
        path.write_bytes(image_bytes(KINDS[i % len(KINDS)], *size, seed=i + offset))
        paths.append(path)
    return paths


def make_imagenet(root: Path, wnids=WNIDS, n_train=5, n_val=2, **kwargs) -> Path:
    for w in wnids:
        write_class_dir(root / "train" / w, w, n_train, **kwargs)
        write_class_dir(root / "val" / w, w, n_val, start=100, **kwargs)
    return root


def tgz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def stored(split, i: int) -> np.ndarray:
    """Image ``i`` of an encoded split as stored (full size, RGB)."""
    return decode_image(split.images.encoded(i))


def contents(split) -> list[tuple[int, str]]:
    """(label, sha256 of the stored bytes) of every image, sorted: a split's content whatever its order."""
    return sorted((int(y), hashlib.sha256(bytes(split.images.encoded(i))).hexdigest())
                  for i, y in enumerate(split.labels))


def check_encoded_split(split, count: int, labels: list[int]):
    assert split.encoded and split.num_images == count
    assert sorted(split.labels.tolist()) == sorted(labels)
    batch = split.images[0:4]
    size = split.images.size
    assert batch.dtype == np.uint8 and batch.shape == (min(4, count), size, size, 3)
    for i in range(count):  # every record decodes to an RGB image
        assert stored(split, i).ndim == 3 and stored(split, i).shape[2] == 3


# --- folder --layout jpeg ------------------------------------------------------------------------


def test_folder_jpeg_layout_keeps_bytes_and_normalises_the_rest(tmp_path, capsys):
    train, test = tmp_path / "train", tmp_path / "test"
    for w in WNIDS[:2]:
        write_class_dir(train / w, w, 5)  # jpeg, png, gray, cmyk, palette
        write_class_dir(test / w, w, 2, start=50)
    (train / WNIDS[0] / "z_rotated.jpg").write_bytes(rotated_jpeg())
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "prepare", "folder", "--source", train, "--test-source", test,
                                "--layout", "jpeg", "--out", out)
    assert code == 0, err
    assert "train 11 JPEG, test 4 JPEG, 2 classes" in stdout
    split = open_split(out, "train", verify=True)
    check_encoded_split(split, 11, [0] * 6 + [1] * 5)
    assert split.meta["layout"] == "jpeg" and split.meta["max_side"] is None and split.meta["quality"] == 95
    files = sorted((train / WNIDS[0]).iterdir()) + sorted((train / WNIDS[1]).iterdir())
    for i, path in enumerate(files):  # label-then-file-name order
        original = path.read_bytes()
        kept = bytes(split.images.encoded(i)) == original
        plain_jpeg = path.name != "z_rotated.jpg" and KINDS[int(path.stem.split("_")[1]) % 5] in ("jpeg", "gray")
        assert kept == plain_jpeg, path.name  # RGB and grayscale JPEGs byte for byte, the rest re-encoded
        if not kept:
            assert Image.open(io.BytesIO(bytes(split.images.encoded(i)))).format == "JPEG"
            assert np.abs(stored(split, i).astype(int) - upright(original).astype(int)).mean() < 6
    rotated = files.index(train / WNIDS[0] / "z_rotated.jpg")
    expected = upright(rotated_jpeg())
    assert expected.shape == (20, 12, 3)  # turned upright: 20 tall, 12 wide
    assert stored(split, rotated).shape == expected.shape
    assert np.abs(stored(split, rotated).astype(int) - expected.astype(int)).mean() < 4
    assert split.meta["reencoded"] == 2 * 3 + 1
    test_split = open_split(out, "test")
    check_encoded_split(test_split, 4, [0, 0, 1, 1])
    info = read_dataset_info(out)
    assert info["request"]["layout"] == "jpeg" and info["request"]["test_source"] == str(test.resolve())


def test_folder_jpeg_max_side_and_quality(tmp_path):
    root = tmp_path / "src"
    for w in WNIDS[:2]:
        write_class_dir(root / w, w, 4, size=(30, 40))
    data = load_source("folder", root, layout="jpeg", max_side=20, quality=80, test_fraction=0.5)
    assert data.max_side == 20 and data.quality == 80
    assert data.request["max_side"] == 20 and data.request["quality"] == 80 and data.request["seed"] == 0
    from onepoch.data.prepared import write_prepared

    write_prepared(data, tmp_path / "out")
    split = open_split(tmp_path / "out", "train")
    assert split.images.image_sizes(np.arange(split.num_images)).tolist() == [[15, 20]] * 4
    assert split.meta["reencoded"] == 4


@pytest.mark.parametrize("args, pattern", [
    (["folder", "--source", "{tmp}", "--layout", "jpeg", "--size", "32"], "keep their size.*--max-side"),
    (["folder", "--source", "{tmp}", "--layout", "jpeg", "--grayscale"], "kept in colour"),
    (["folder", "--source", "{tmp}", "--size", "8", "--max-side", "64"], "--max-side and --quality apply to"),
    (["folder", "--source", "{tmp}", "--layout", "jpeg", "--quality", "0"], r"--quality must be an integer in 1"),
    (["folder", "--source", "{tmp}", "--layout", "jpeg", "--max-side", "0"], "--max-side must be a positive"),
    (["folder", "--source", "{tmp}", "--size", "8", "--classes", "{tmp}/c.txt"], "--classes applies to imagenette"),
    (["imagenet", "--source", "{tmp}", "--layout", "raw"], "kept as JPEG at rest"),
    (["imagenet", "--source", "{tmp}", "--size", "64"], "keep their size"),
    (["imagenet100", "--source", "{tmp}", "--classes", "{tmp}/c.txt"], "imagenet --classes FILE"),
    (["stl10", "--source", "{tmp}", "--layout", "jpeg"], "stl10 is stored raw"),
    (["tiny-imagenet", "--source", "{tmp}", "--quality", "90"], "--max-side and --quality apply to"),
    (["tiny-imagenet", "--source", "{tmp}", "--size", "32"], "images are 64x64 and cannot be resized"),
    (["stl10", "--source", "{tmp}", "--grayscale"], "images are RGB"),
    (["imagenette", "--source", "{tmp}", "--test-fraction", "0.1"], "comes with its own test split"),
    (["imagenet", "--no-download"], "no public download.*image-net.org.*--source DIR"),
    (["imagenette-160", "--no-download"], r"imagenette2-160\.tgz not found in .*downloads/imagenette-160.*"
                                          r"https://s3\.amazonaws\.com/fast-ai-imageclas/imagenette2-160\.tgz"),
    (["tiny-imagenet", "--no-download"], r"http://cs231n\.stanford\.edu/tiny-imagenet-200\.zip"),
    (["stl10", "--no-download"], r"stl10_binary\.tar\.gz not found.*stl10_binary\.tar\.gz and pass --source"),
])
def test_options_that_do_not_apply_are_one_line_errors(tmp_path, capsys, args, pattern):
    (tmp_path / "c.txt").write_text("n01440764\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prepare", *[a.format(tmp=tmp_path) for a in args], "--out", out)
    assert_one_line_error(code, err, pattern)
    assert_nothing_written(out)


def test_help_lists_every_source(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in SOURCE_NAMES:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name
    for option in ("--layout", "--max-side", "--quality", "--classes"):
        assert option in text


# --- imagenette ----------------------------------------------------------------------------------


def make_imagenette(parent: Path, name: str = "imagenette2-320", **kwargs) -> Path:
    root = make_imagenet(parent / name, WNIDS[:3], n_train=5, n_val=2, **kwargs)
    (root / "noisy_imagenette.csv").write_text("path,noisy_labels_0\n")
    return root


def test_imagenette_folder_and_archive_give_the_same_dataset(tmp_path, capsys):
    root = make_imagenette(tmp_path / "src")
    (root / "train" / WNIDS[1] / "zz_rotated.JPEG").write_bytes(rotated_jpeg())
    archive = tgz(root, tmp_path / "imagenette2-320.tgz")
    outs = {}
    for kind, source in (("folder", tmp_path / "src"), ("archive", archive)):
        outs[kind] = tmp_path / f"out-{kind}"
        code, stdout, err = run_cli(capsys, "prepare", "imagenette-320", "--source", source, "--out", outs[kind])
        assert code == 0, err
        assert "train 16 JPEG, test 6 JPEG, 3 classes" in stdout
    for split, count, labels in (("train", 16, [0] * 5 + [1] * 6 + [2] * 5), ("test", 6, [0, 0, 1, 1, 2, 2])):
        a, b = open_split(outs["folder"], split, verify=True), open_split(outs["archive"], split, verify=True)
        check_encoded_split(a, count, labels)
        check_encoded_split(b, count, labels)
        assert contents(a) == contents(b)
        assert a.class_names == ["tench", "English springer", "cassette player"]
    info = read_dataset_info(outs["archive"])
    assert info["request"]["files"]["imagenette2-320.tgz"]["bytes"] == archive.stat().st_size
    assert read_dataset_info(outs["folder"])["request"]["source"] == str(root.resolve())
    # the EXIF-rotated image is stored upright
    train = open_split(outs["archive"], "train")
    shapes = [stored(train, i).shape for i in range(train.num_images)]
    assert shapes.count((20, 12, 3)) == 1
    i = shapes.index((20, 12, 3))
    assert train.labels[i] == 1
    assert np.abs(stored(train, i).astype(int) - upright(rotated_jpeg()).astype(int)).mean() < 4


def test_imagenette_classes_subset_from_the_archive(tmp_path):
    archive = tgz(make_imagenette(tmp_path / "src"), tmp_path / "imagenette2-320.tgz")
    (tmp_path / "two.txt").write_text(f"# two classes\n{WNIDS[2]}\n\n{WNIDS[0]}\n")
    data = load_source("imagenette-320", archive, classes=tmp_path / "two.txt")
    assert data.class_names == ["tench", "cassette player"] and data.request["classes"] == [WNIDS[0], WNIDS[2]]
    assert data.splits["train"].count == 10 and data.splits["test"].count == 4
    assert sorted(r[2] for r in data.splits["test"].records()) == [0, 0, 1, 1]
    assert all(f"/{WNIDS[1]}/" not in r[0] for r in data.splits["train"].records())


def test_imagenette_download_is_checked_against_the_pinned_md5(tmp_path, http_server, monkeypatch, capsys):
    archive = tgz(make_imagenette(tmp_path / "src", "imagenette2-160"), http_server.root / "imagenette2-160.tgz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    url = f"{http_server.url}/imagenette2-160.tgz"
    monkeypatch.setitem(sources.ARCHIVES, "imagenette-160", sources.Archive("imagenette2-160.tgz", url, "0" * 32))
    with pytest.raises(DataError, match=rf"imagenette-160: download of {re.escape(url)} failed: its md5 {md5} is not "
                                        rf"the pinned 0{{32}}; the file was deleted; download"):
        load_source("imagenette-160")
    cache = tmp_path / "cache" / "downloads" / "imagenette-160"
    assert not any(cache.iterdir())
    monkeypatch.setitem(sources.ARCHIVES, "imagenette-160", sources.Archive("imagenette2-160.tgz", url, md5))
    data = load_source("imagenette-160")
    assert data.splits["train"].count == 15 and (cache / "imagenette2-160.tgz").is_file()
    requests = len(http_server.requested)
    assert load_source("imagenette-160", download=False).splits["test"].count == 6  # from the cache
    assert len(http_server.requested) == requests


def test_md5_pins_in_download_helpers(tmp_path, capsys):
    path = tmp_path / "f"
    path.write_bytes(b"payload")
    md5 = hashlib.md5(b"payload").hexdigest()
    assert file_digest(path, "md5") == md5
    assert dl.verified_file(path, md5=md5.upper()) == path
    assert dl.verified_file(path, md5="0" * 32) is None and not path.exists()
    assert re.fullmatch(rf"onepoch: warning: deleted {re.escape(str(path))}: its md5 {md5} is not the pinned 0{{32}}\n",
                        capsys.readouterr().err)
    with pytest.raises(ValueError, match="exactly one"):
        dl.verified_file(path)
    with pytest.raises(ValueError, match="exactly one"):
        dl.download("http://127.0.0.1:1/f", path, sha256="0" * 64, md5=md5, desc="f")


def test_every_archive_has_a_pinned_md5():
    assert set(sources.ARCHIVES) == {"imagenette", "imagenette-320", "imagenette-160", "tiny-imagenet", "stl10"}
    hashes = [a.md5 for a in sources.ARCHIVES.values()]
    assert all(re.fullmatch(r"[0-9a-f]{32}", h) for h in hashes) and len(set(hashes)) == len(hashes)
    assert sources.ARCHIVES["stl10"].md5 == "91f7769df0f17e558f3565bffb0c7dfb"  # torchvision's
    assert sources.ARCHIVES["tiny-imagenet"].md5 == "90528d7ca1a48142e341f4ef8d21d0de"
    assert all(a.url.endswith("/" + a.file) for a in sources.ARCHIVES.values())
    assert set(IMAGENETTE_NAMES) == {"n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916",
                                     "n03417042", "n03425413", "n03445777", "n03888257"}


# --- imagenet / imagenet100 ---------------------------------------------------------------------


def test_imagenet_sorted_val_and_classes_subset(tmp_path, capsys):
    root = make_imagenet(tmp_path / "ilsvrc", n_train=5, n_val=2)
    (tmp_path / "classes.txt").write_text(f"{WNIDS[3]}\n{WNIDS[1]}\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "prepare", "imagenet", "--source", root, "--classes", tmp_path / "classes.txt",
                                "--out", out)
    assert code == 0, err
    train, test = open_split(out, "train", verify=True), open_split(out, "test", verify=True)
    assert train.class_names == [WNIDS[1], WNIDS[3]]
    check_encoded_split(train, 10, [0] * 5 + [1] * 5)
    check_encoded_split(test, 4, [0, 0, 1, 1])
    assert read_dataset_info(out)["request"]["classes"] == [WNIDS[1], WNIDS[3]]
    # every class when --classes is not given
    all_classes = load_source("imagenet", root)
    assert all_classes.class_names == WNIDS and all_classes.splits["train"].count == 20
    # a class that is not there
    (tmp_path / "bad.txt").write_text("n09999999\n")
    with pytest.raises(DataError, match=r"no class folder for 1 of the 1 requested class\(es\): n09999999"):
        load_source("imagenet", root, classes=tmp_path / "bad.txt")
    (tmp_path / "dup.txt").write_text(f"{WNIDS[0]}\n{WNIDS[0]}\n")
    with pytest.raises(DataError, match=r"dup\.txt: class n01440764 is listed more than once"):
        load_source("imagenet", root, classes=tmp_path / "dup.txt")


def test_imagenet_flat_val_labelled_by_kaggle_csv(tmp_path):
    kaggle = tmp_path / "kaggle"
    root = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    for w in WNIDS[:3]:
        write_class_dir(root / "train" / w, w, 3)
    val = root / "val"
    val.mkdir(parents=True)
    truth = {}
    for i in range(7):
        w = WNIDS[(i * 2) % 3]
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(image_bytes("jpeg", 16, 16, 200 + i))
        truth[f"ILSVRC2012_val_{i:08d}"] = w
    rows = "".join(f"{k},{w} 1 2 3 4 {w} 5 6 7 8 \n" for k, w in reversed(truth.items()))
    (kaggle / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + rows)
    data = load_source("imagenet", kaggle)
    assert data.source == str(root.resolve()) and data.class_names == WNIDS[:3]
    records = list(data.splits["test"].records())
    assert [Path(r[0]).stem for r in records] == sorted(truth)
    assert [r[2] for r in records] == [WNIDS.index(truth[Path(r[0]).stem]) for r in records]
    assert str(kaggle / "LOC_val_solution.csv") in data.request["files"]
    subset = load_source("imagenet", kaggle, classes=[WNIDS[2], WNIDS[0]])
    assert [r[2] for r in subset.splits["test"].records()] == [0 if truth[Path(r[0]).stem] == WNIDS[0] else 1
                                                                for r in records if truth[Path(r[0]).stem] != WNIDS[1]]
    (val / "ILSVRC2012_val_00000099.JPEG").write_bytes(image_bytes("jpeg", 16, 16, 1))
    with pytest.raises(DataError, match=r"ILSVRC2012_val_00000099\.JPEG: not listed in .*LOC_val_solution\.csv"):
        load_source("imagenet", kaggle)


def test_imagenet_flat_val_without_labels_says_how_to_sort_it(tmp_path, capsys):
    root = tmp_path / "ilsvrc"
    for w in WNIDS[:2]:
        write_class_dir(root / "train" / w, w, 2)
    write_class_dir(root / "val", "x", 3)  # flat
    code, _, err = run_cli(capsys, "prepare", "imagenet", "--source", root, "--out", tmp_path / "out")
    assert_one_line_error(code, err, r"val: the validation images are not sorted into class folders and no "
                                     r"LOC_val_solution\.csv was found; sort the validation images into val/<wnid>/")
    assert_nothing_written(tmp_path / "out")


def test_imagenet_is_found_in_the_cache_directory(tmp_path):
    make_imagenet(tmp_path / "cache" / "downloads" / "imagenet", WNIDS[:2], n_train=2, n_val=1)
    data = load_source("imagenet")
    assert data.splits["train"].count == 4 and data.splits["test"].count == 2


def test_imagenet100_ships_the_cmc_list(tmp_path):
    lines = [ln for ln in IMAGENET100_FILE.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 100 and len(set(lines)) == 100
    assert all(re.fullmatch(r"n\d{8}", w) for w in lines)
    assert lines[:3] == ["n02869837", "n01749939", "n02488291"] and lines[-1] == "n02090622"  # CMC's order
    assert imagenet100_classes() == sorted(lines) == read_class_list(IMAGENET100_FILE)
    import importlib.resources

    shipped = importlib.resources.files("onepoch.data") / "imagenet100_classes.txt"
    assert shipped.is_file()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert "data/imagenet100_classes.txt" in pyproject


def test_imagenet100_keeps_its_classes(tmp_path, capsys):
    wnids = imagenet100_classes()
    root = tmp_path / "ilsvrc"
    for w in [*wnids, "n01440764"]:  # tench is not one of the 100
        for split in ("train", "val"):
            (root / split / w).mkdir(parents=True)
            (root / split / w / f"{w}.JPEG").write_bytes(image_bytes("jpeg", 8, 8, 3))
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "prepare", "imagenet100", "--source", root, "--out", out)
    assert code == 0, err
    assert "train 100 JPEG, test 100 JPEG, 100 classes" in stdout
    test = open_split(out, "test")
    assert test.class_names == wnids and test.labels.tolist() == list(range(100))
    assert read_dataset_info(out)["request"]["classes"] == wnids


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
@pytest.mark.parametrize("where", ["folder", "archive"])
def test_a_bad_image_is_one_line_naming_it_and_nothing_is_written(tmp_path, capsys, damage, where):
    root = make_imagenette(tmp_path / "src")
    bad = root / "train" / WNIDS[1] / f"{WNIDS[1]}_3.JPEG"
    good = image_bytes("jpeg", 40, 40, 5)
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 20 if damage == "corrupt" else good[: len(good) // 2])
    source = tmp_path / "src" if where == "folder" else tgz(root, tmp_path / "imagenette2-320.tgz")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prepare", "imagenette-320", "--source", source, "--out", out)
    assert_one_line_error(code, err, rf"{WNIDS[1]}/{bad.name}: (not a readable image|cannot decode)")
    assert_nothing_written(out)


def test_prepare_is_idempotent_and_refuses_another_dataset(tmp_path, capsys):
    root = make_imagenet(tmp_path / "ilsvrc", WNIDS[:2], n_train=3, n_val=1)
    out = tmp_path / "out"
    assert run_cli(capsys, "prepare", "imagenet", "--source", root, "--out", out)[0] == 0
    created = read_dataset_info(out)["created"]
    code, stdout, _ = run_cli(capsys, "prepare", "imagenet", "--source", root, "--out", out)
    assert code == 0 and "already holds this prepared dataset" in stdout
    # other options, another dataset, or a changed source: refused without --force
    code, _, err = run_cli(capsys, "prepare", "imagenet", "--source", root, "--max-side", "16", "--out", out)
    assert_one_line_error(code, err, "already holds another prepared dataset.*--force")
    make_imagenette(tmp_path / "nette")
    code, _, err = run_cli(capsys, "prepare", "imagenette", "--source", tmp_path / "nette", "--out", out)
    assert_one_line_error(code, err, "already holds another prepared dataset.*--force")
    write_class_dir(root / "train" / WNIDS[0], WNIDS[0], 1, start=77)  # a new image
    code, _, err = run_cli(capsys, "prepare", "imagenet", "--source", root, "--out", out)
    assert_one_line_error(code, err, "already holds another prepared dataset.*--force")
    assert read_dataset_info(out)["created"] == created
    code, _, _ = run_cli(capsys, "prepare", "imagenet", "--source", root, "--out", out, "--force")
    assert code == 0 and open_split(out, "train").num_images == 7


# --- tiny-imagenet ------------------------------------------------------------------------------


TINY_WNIDS = ["n02124075", "n01443537", "n04067472"]  # wnids.txt order (not sorted)


def make_tiny(root: Path, n_train: int = 5) -> tuple[Path, dict[str, str]]:
    """A small tiny-imagenet-200 folder; returns it and val file -> wnid."""
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (root / "words.txt").write_text("n00001740\tentity\nn01443537\tgoldfish, Carassius auratus\n"
                                    "n02124075\tEgyptian cat\nn04067472\treel\n")
    for w in TINY_WNIDS:
        write_class_dir(root / "train" / w / "images", w, n_train, size=(64, 64))
        (root / "train" / w / f"{w}_boxes.txt").write_text("x\t0\t0\t63\t63\n")
    val = root / "val" / "images"
    val.mkdir(parents=True)
    truth = {}
    for i in range(6):
        name = f"val_{i}.JPEG"
        (val / name).write_bytes(image_bytes(KINDS[i % 5], 64, 64, 300 + i))
        truth[name] = TINY_WNIDS[(i * 5) % 3]
    (val / "val_5.JPEG").write_bytes(rotated_jpeg(64, 64, orientation=3))  # upside down
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{w}\t0\t0\t63\t63\n" for name, w in truth.items()))
    (root / "test" / "images").mkdir(parents=True)
    (root / "test" / "images" / "test_0.JPEG").write_bytes(image_bytes("jpeg", 64, 64, 1))
    return root, truth


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
    return archive


def test_tiny_imagenet_folder_and_zip(tmp_path, capsys):
    root, truth = make_tiny(tmp_path / "src" / "tiny-imagenet-200")
    archive = zip_folder(root, tmp_path / "tiny-imagenet-200.zip")
    sorted_wnids = sorted(TINY_WNIDS)
    results = {}
    for kind, source in (("folder", tmp_path / "src"), ("zip", archive)):
        out = tmp_path / f"out-{kind}"
        code, stdout, err = run_cli(capsys, "prepare", "tiny-imagenet", "--source", source, "--out", out)
        assert code == 0, err
        assert "train 15 x 64x64x3, test 6 x 64x64x3, 3 classes" in stdout
        results[kind] = (open_split(out, "train", verify=True), open_split(out, "test", verify=True))
    for a, b in zip(*results.values()):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    train, test = results["folder"]
    assert train.class_names == ["goldfish", "Egyptian cat", "reel"]  # sorted wnids, first name of words.txt
    assert train.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert test.labels.tolist() == [sorted_wnids.index(truth[f"val_{i}.JPEG"]) for i in range(6)]
    for i in range(5):  # train images of class 0 in file order: every kind, grayscale and CMYK as RGB
        original = (root / "train" / sorted_wnids[0] / "images" / f"{sorted_wnids[0]}_{i}.JPEG").read_bytes()
        assert np.array_equal(train.images[i], upright(original))
    gray = train.images[2]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    assert np.array_equal(test.images[5], upright(rotated_jpeg(64, 64, orientation=3)))
    assert not np.array_equal(test.images[5], np.asarray(Image.open(root / "val" / "images" / "val_5.JPEG")))


def test_tiny_imagenet_classes_and_errors(tmp_path):
    root, truth = make_tiny(tmp_path / "tiny-imagenet-200")
    data = load_source("tiny-imagenet", root, classes=["n04067472", "n01443537"])
    assert data.class_names == ["goldfish", "reel"] and data.splits["train"].labels.tolist() == [0] * 5 + [1] * 5
    assert data.splits["test"].labels.tolist() == [{"n01443537": 0, "n04067472": 1}[w] for w in truth.values()
                                                   if w != "n02124075"]
    write_class_dir(root / "train" / TINY_WNIDS[0] / "images", TINY_WNIDS[0], 1, start=9, size=(60, 64))
    with pytest.raises(DataError, match=rf"{TINY_WNIDS[0]}_9\.JPEG: image is 64x60, Tiny ImageNet images are 64x64"):
        load_source("tiny-imagenet", root)
    good = image_bytes("jpeg", 64, 64, 1)
    for broken in (b"\xff\xd8\xff\xe0" + b"garbage" * 20, good[: len(good) // 2]):  # corrupt, truncated
        (root / "train" / TINY_WNIDS[0] / "images" / f"{TINY_WNIDS[0]}_9.JPEG").write_bytes(broken)
        with pytest.raises(DataError, match=rf"images/{TINY_WNIDS[0]}_9\.JPEG: cannot decode image") as info:
            load_source("tiny-imagenet", root)
        assert "\n" not in str(info.value)
    (root / "train" / TINY_WNIDS[0] / "images" / f"{TINY_WNIDS[0]}_9.JPEG").unlink()
    (root / "val" / "images" / "val_9.JPEG").write_bytes(good)
    with pytest.raises(DataError, match=r"val/images/val_9\.JPEG: has no label in .*val_annotations\.txt"):
        load_source("tiny-imagenet", root)
    (root / "val" / "images" / "val_9.JPEG").unlink()
    (root / "wnids.txt").unlink()
    with pytest.raises(DataError, match=r"tiny-imagenet-200/wnids\.txt: missing"):
        load_source("tiny-imagenet", root)


# --- stl10 ----------------------------------------------------------------------------------------


def stl10_bytes(images: np.ndarray) -> bytes:
    """Images (n, 96, 96, 3) in STL-10's layout, written index by index: byte c*9216 + x*96 + y of each
    image is channel c of the pixel in row y, column x."""
    n = images.shape[0]
    out = np.empty((n, IMAGE_BYTES), np.uint8)
    c, x, y = np.meshgrid(np.arange(3), np.arange(96), np.arange(96), indexing="ij")
    index = (c * 9216 + x * 96 + y).ravel()
    for k in range(n):
        out[k, index] = images[k][y.ravel(), x.ravel(), c.ravel()]
    return out.tobytes()


def make_stl10(folder: Path, n_train=4, n_test=3, n_unlabeled=5, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    arrays = {s: rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
              for s, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled))}
    arrays["train_y"] = (np.arange(n_train) % 10 + 1).astype(np.uint8)
    arrays["test_y"] = (np.arange(n_test) * 3 % 10 + 1).astype(np.uint8)
    for s in ("train", "test", "unlabeled"):
        (folder / f"{s}_X.bin").write_bytes(stl10_bytes(arrays[s]))
    for s in ("train", "test"):
        (folder / f"{s}_y.bin").write_bytes(arrays[f"{s}_y"].tobytes())
    (folder / "class_names.txt").write_text("airplane\nbird\ncar\ncat\ndeer\ndog\nhorse\nmonkey\nship\ntruck\n")
    (folder / "fold_indices.txt").write_text("0 1\n")
    return arrays


def test_stl10_reads_the_column_major_layout():
    one = np.zeros((1, 96, 96, 3), np.uint8)
    one[0, 0, 5, 0] = 255  # red at row 0, column 5
    raw = np.frombuffer(stl10_bytes(one), np.uint8)
    assert np.flatnonzero(raw).tolist() == [5 * 96]  # channel 0, column 5, row 0
    from onepoch.data.stl10 import images_from_bytes

    assert np.array_equal(images_from_bytes(raw), one)


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_stl10_splits_round_trip(tmp_path, capsys, form):
    folder = tmp_path / "src" / "stl10_binary"
    arrays = make_stl10(folder)
    source = tmp_path / "src" if form == "folder" else tgz(folder, tmp_path / "stl10_binary.tar.gz")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "prepare", "stl10", "--source", source, "--out", out)
    assert code == 0, err
    assert "train 4 x 96x96x3, test 3 x 96x96x3, train+unlabeled 9 x 96x96x3, 10 classes" in stdout
    train, test = open_split(out, "train", verify=True), open_split(out, "test", verify=True)
    both = open_split(out, "train+unlabeled", verify=True)
    assert np.array_equal(train.images, arrays["train"]) and np.array_equal(test.images, arrays["test"])
    assert train.labels.tolist() == (arrays["train_y"].astype(int) - 1).tolist()
    assert test.labels.tolist() == (arrays["test_y"].astype(int) - 1).tolist()
    assert np.array_equal(both.images, np.concatenate([arrays["train"], arrays["unlabeled"]]))
    assert both.labels.tolist() == [0] * 9
    assert train.class_names[0] == "airplane" and train.class_names[-1] == "truck"
    request = read_dataset_info(out)["request"]
    assert request["unlabeled_splits"] == ["train+unlabeled"]
    code, stdout, _ = run_cli(capsys, "prepare", "stl10", "--source", source, "--out", out)
    assert code == 0 and "already holds this prepared dataset" in stdout


def test_stl10_damaged_files(tmp_path, capsys):
    folder = tmp_path / "stl10_binary"
    make_stl10(folder)
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 11, 4]))
    with pytest.raises(DataError, match=r"train_y\.bin: labels must lie in 1\.\.10, found 1\.\.11"):
        load_source("stl10", folder)
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(DataError, match=r"train_y\.bin: 3 labels for 4 images in train_X\.bin"):
        load_source("stl10", folder)
    (folder / "test_X.bin").write_bytes(b"\0" * 1000)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prepare", "stl10", "--source", folder, "--out", out)
    assert_one_line_error(code, err, r"test_X\.bin: 1,000 bytes is not a whole number of 96x96x3 images")
    assert_nothing_written(out)
    (folder / "unlabeled_X.bin").unlink()
    with pytest.raises(DataError, match=r"missing STL-10 file\(s\) unlabeled_X\.bin"):
        load_source("stl10", folder)


def test_stl10_truncated_archive(tmp_path):
    make_stl10(tmp_path / "stl10_binary")
    archive = tgz(tmp_path / "stl10_binary", tmp_path / "stl10_binary.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=r"stl10_binary\.tar\.gz: cannot read .*truncated or corrupt"):
        load_source("stl10", archive)


def test_npz_of_jpeg_bytes_with_layout_jpeg(tmp_path):
    blobs = {s: [image_bytes(k, 20, 30, i) for i, k in enumerate(("jpeg", "png", "gray", "cmyk"))]
             for s in ("train", "test")}
    arrays = {}
    for s, items in blobs.items():
        arrays[f"{s}_jpeg"] = np.frombuffer(b"".join(items), np.uint8)
        arrays[f"{s}_offsets"] = np.cumsum([0] + [len(b) for b in items])
        arrays[f"y_{s}"] = np.array([0, 1, 0, 1])
    np.savez(tmp_path / "d.npz", **arrays)
    data = load_source("npz", tmp_path / "d.npz", layout="jpeg", max_side=24)
    assert data.request["layout"] == "jpeg" and data.request["max_side"] == 24 and "d.npz" in data.request["files"]
    from onepoch.data.prepared import write_prepared

    write_prepared(data, tmp_path / "out")
    split = open_split(tmp_path / "out", "train", verify=True)
    check_encoded_split(split, 4, [0, 1, 0, 1])
    assert split.images.image_sizes(np.arange(4)).tolist() == [[16, 24]] * 4  # shrunk to --max-side
