"""Unlabelled image folders: ``prepare folder --unlabelled``, training without the online probe, eval's
refusal, and ``onepoch embed`` / ``onepoch.embed_folder`` (features of any image folder)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onepoch
from onepoch.config import parse_override
from onepoch.data import open_split, write_prepared
from onepoch.data.sources import load_source
from onepoch.errors import ConfigError, DataError
from test_cli import assert_one_line_error, run_cli
from test_train import TINY

# (width, height) of the generated photos: landscape, portrait, square
SIZES = [(40, 30), (24, 50), (33, 33)]
# where each of the 9 images goes: loose in the root, one level down, two levels down
PLACES = ["", "", "", "trip", "trip", "trip/day2", "trip/day2", "misc", "misc"]
SIZE = 16
RUN = [*TINY, "views.preset=emp_ssl_cifar", "data.batch_size=4", "name=unl"]


def make_photos(root: Path, seed: int = 0) -> list[str]:
    """Nine RGB JPEGs of mixed sizes in a tree without class folders (one PNG among them); returns their
    paths relative to ``root`` in the order a listing gives (each directory's entries sorted by name)."""
    rng = np.random.default_rng(seed)
    for i, place in enumerate(PLACES):
        w, h = SIZES[i % 3]
        path = root / place / (f"p{i}.png" if i == 4 else f"p{i}.jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return ["misc/p7.jpg", "misc/p8.jpg", "p0.jpg", "p1.jpg", "p2.jpg", "trip/day2/p5.jpg", "trip/day2/p6.jpg",
            "trip/p3.jpg", "trip/p4.png"]


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    return root, make_photos(root)


def test_prepare_unlabelled_folder(tmp_path, capsys, photos):
    root, names = photos
    out = tmp_path / "data"
    code, stdout, _ = run_cli(capsys, "prepare", "folder", "--unlabelled", "--source", root, "--size", SIZE,
                              "--out", out)
    assert code == 0 and f"train 9 x {SIZE}x{SIZE}x3, unlabelled" in stdout
    assert json.loads((out / "dataset.json").read_text())["splits"] == ["train"]
    split = open_split(out, "train", verify=True)
    assert split.meta["labelled"] is False and split.num_images == 9 and split.shape == (SIZE, SIZE, 3)
    assert split.labels.tolist() == [0] * 9
    # the rows follow the listing order: row 2 is p0.jpg (40x30), resized to 21x16 then centre-cropped
    with Image.open(root / names[2]) as img:
        expected = np.asarray(img.convert("RGB").resize((21, SIZE), Image.Resampling.BICUBIC).crop((2, 0, 18, 16)))
    assert np.abs(split.images[2].astype(int) - expected.astype(int)).max() <= 1
    # the same files again: nothing to do; a photo added anywhere: the dataset is stale
    code, stdout, _ = run_cli(capsys, "prepare", "folder", "--unlabelled", "--source", root, "--size", SIZE,
                              "--out", out)
    assert code == 0 and "nothing to do" in stdout
    Image.new("RGB", (20, 20)).save(root / "trip" / "day2" / "new.jpg")
    code, _, err = run_cli(capsys, "prepare", "folder", "--unlabelled", "--source", root, "--size", SIZE,
                           "--out", out)
    assert_one_line_error(code, err, r"the source files changed since it was prepared.*--force")


def test_prepare_unlabelled_folder_jpeg_at_rest(tmp_path, photos):
    root, _ = photos
    data = load_source("folder", root, layout="jpeg", unlabelled=True)
    write_prepared(data, tmp_path / "data")
    split = open_split(tmp_path / "data", "train", verify=True)
    assert split.meta["labelled"] is False and split.meta["layout"] == "jpeg" and split.num_images == 9


@pytest.mark.parametrize("bad, pattern", [
    ("trip/notes.txt", r"trip/notes\.txt: not an image file \(expected \.png, \.jpg, \.jpeg\)$"),
    ("trip/day2/broken.jpg", r"trip/day2/broken\.jpg: cannot decode image \("),
])
def test_bad_files_are_one_line_errors(tmp_path, capsys, photos, bad, pattern):
    root, _ = photos
    (root / bad).write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 5)
    code, _, err = run_cli(capsys, "prepare", "folder", "--unlabelled", "--source", root, "--size", SIZE,
                           "--out", tmp_path / "data")
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "data").exists()
    with pytest.raises(DataError, match=pattern):  # the Python API's error, the same line
        load_source("folder", root, size=SIZE, unlabelled=True)


def test_unlabelled_options_that_do_not_apply(tmp_path, capsys, photos):
    root, _ = photos
    code, _, err = run_cli(capsys, "prepare", "folder", "--unlabelled", "--source", root, "--size", SIZE,
                           "--test-fraction", "0.2", "--out", tmp_path / "data")
    assert_one_line_error(code, err, r"an unlabelled folder has a single split, no test split")
    code, _, err = run_cli(capsys, "prepare", "cifar10", "--unlabelled", "--out", tmp_path / "data")
    assert_one_line_error(code, err, r"cifar10: --unlabelled applies to folder sources")
    empty = tmp_path / "empty" / "sub"
    empty.mkdir(parents=True)
    code, _, err = run_cli(capsys, "prepare", "folder", "--unlabelled", "--source", empty.parent, "--size", SIZE,
                           "--out", tmp_path / "data")
    assert_one_line_error(code, err, r"contains no images \(\.png, \.jpg, \.jpeg\) at any depth")


def test_train_embed_and_eval_refusal(tmp_path, capsys, photos):
    root, names = photos
    data = tmp_path / "data"
    assert run_cli(capsys, "prepare", "folder", "--unlabelled", "--source", root, "--size", SIZE, "--out", data)[0] == 0
    common = [*RUN, f"data.root={data}", f"train.out={tmp_path / 'runs'}"]
    # an explicit online probe on unlabelled images is refused; left unset it is off, said once
    code, _, err = run_cli(capsys, "train", "emp_ssl/cifar10_cpu", *common, "train.online_probe=true")
    assert_one_line_error(code, err, r"has no labels .* set train.online_probe=false")
    code, stdout, err = run_cli(capsys, "train", "emp_ssl/cifar10_cpu", *common)
    assert code == 0, err
    assert err.count("is unlabelled: training without the online probe") == 1
    run_dir = tmp_path / "runs" / "unl"
    assert "trained to step 2" in stdout and not (run_dir / "online_probe.json").exists()
    # eval refuses with one line that says how to evaluate on labelled images
    code, _, err = run_cli(capsys, "eval", run_dir)
    assert_one_line_error(code, err, r"split 'train' of .* has no real labels.*data.train_split=<a labelled split>"
                                     r".*data.root=<a labelled prepared dataset")
    # embed from the command line: the folder, then the prepared dataset (the same pixels, the same features)
    out = tmp_path / "emb" / "photos.npy"
    code, stdout, err = run_cli(capsys, "embed", run_dir, "--data", root, "--out", out)
    assert code == 0, err
    assert "9 x 32 float32 features" in stdout
    features = np.load(out)
    assert features.dtype == np.float32 and features.shape == (9, 32) and np.isfinite(features).all()
    assert (tmp_path / "emb" / "photos.files.txt").read_text().splitlines() == names
    code, _, err = run_cli(capsys, "embed", run_dir, "--data", data, "--out", out)
    assert_one_line_error(code, err, r"photos\.npy already exists; pass --force")
    code, _, err = run_cli(capsys, "embed", run_dir, "--data", data, "--out", out, "--force")
    assert code == 0, err
    assert np.allclose(np.load(out), features, atol=1e-4)
    assert (tmp_path / "emb" / "photos.files.txt").read_text().splitlines() == [f"train/{i}" for i in range(9)]
    # and from Python: the same rows, nothing written without out=
    result = onepoch.embed_folder(run_dir, root)
    assert result.path is None and result.files == names and np.allclose(result.features, features, atol=1e-5)
    with pytest.raises(ConfigError, match=r"already exists; pass --force"):
        onepoch.embed_folder(run_dir, root, out=out)
    written = onepoch.embed_folder(run_dir, root, out=tmp_path / "again.npy")
    assert written.files_path == tmp_path / "again.files.txt" and np.array_equal(np.load(written.path), result.features)


def test_python_api_prepare_train_embed(tmp_path, photos):
    root, names = photos
    data = load_source("folder", root, size=SIZE, unlabelled=True)
    write_prepared(data, tmp_path / "data")
    run = onepoch.train("emp_ssl/cifar10_cpu", progress_bar=False, **dict(parse_override(o) for o in RUN),
                        data={"root": str(tmp_path / "data")}, train={"out": str(tmp_path / "runs")})
    assert run.online_probe_test_acc is None and run.steps == 2
    emb = onepoch.embed_folder(run.run_dir, root, out=tmp_path / "f.npy")
    assert emb.features.shape == (9, 32) and emb.files == names
    with pytest.raises(ConfigError, match=r"give a name ending in \.npy"):
        onepoch.embed_folder(run.run_dir, root, out=tmp_path / "f.txt")
