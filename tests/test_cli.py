"""The command line: prepare and views end to end, and one-line errors with a non-zero exit."""

import gzip
import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onepoch.cli import main
from onepoch.data import open_split, sources

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def write_idx_dir(directory: Path, n_train=30, n_test=10, seed=0) -> Path:
    """Four small gzipped IDX files (28x28 images, labels 0..9)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = [rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), np.arange(n_train, dtype=np.uint8) % 10,
              rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), np.arange(n_test, dtype=np.uint8) % 10]
    for stem, a in zip(IDX_STEMS, arrays):
        magic = 0x803 if a.ndim == 3 else 0x801
        payload = struct.pack(">I", magic) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
        (directory / f"{stem}.gz").write_bytes(gzip.compress(payload))
    return directory


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onepoch: error: ")
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_prepare_fashion_mnist_offline_and_idempotent(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ONEPOCH_OFFLINE", "1")
    out = tmp_path / "fm"
    code, stdout, _ = run_cli(capsys, "prepare", "fashion-mnist", "--out", out)
    assert code == 0 and "train 60,000 x 28x28x1, test 10,000 x 28x28x1, 10 classes" in stdout
    train = open_split(out, "train", verify=True)
    assert train.class_names[0] == "T-shirt/top" and np.bincount(train.labels).tolist() == [6000] * 10
    stamp = (out / "train" / "images.npy").stat().st_mtime_ns
    code, stdout, _ = run_cli(capsys, "prepare", "fashion-mnist", "--out", out)
    assert code == 0 and "already holds this prepared dataset" in stdout
    assert (out / "train" / "images.npy").stat().st_mtime_ns == stamp


def test_prepare_then_views_grid(tmp_path, capsys):
    out = tmp_path / "mnist"
    code, stdout, _ = run_cli(capsys, "prepare", "mnist", "--source", write_idx_dir(tmp_path / "src"), "--out", out)
    assert code == 0 and "train 30 x 28x28x1" in stdout
    png = tmp_path / "grids" / "v.png"
    code, stdout, _ = run_cli(capsys, "views", out, "--out", png, "--images", 3, "--views", 4, "count=6")
    assert code == 0 and "3 images x 4 views of 16x16" in stdout
    with Image.open(png) as im:
        assert im.format == "PNG"
        # columns: original + 4 views of 16 px with 2 px gaps, each pixel drawn 4 times (the default zoom)
        assert im.size[0] == 4 * (5 * (16 + 2) + 2)
    code, stdout, _ = run_cli(capsys, "views", out, "--out", tmp_path / "v.svg", "--images", 2)
    assert code == 0 and (tmp_path / "v.svg").read_bytes().startswith(b"<?xml")
    code, _, err = run_cli(capsys, "views", out, "--out", tmp_path / "v.jpg")
    assert_one_line_error(code, err, r"\.png, \.svg or \.pdf, not '\.jpg'")


def test_force_rebuilds_a_prepared_dataset(tmp_path, capsys):
    out = tmp_path / "mnist"
    run_cli(capsys, "prepare", "mnist", "--source", write_idx_dir(tmp_path / "a", seed=0), "--out", out)
    first = open_split(out).images.copy()
    code, _, err = run_cli(capsys, "prepare", "mnist", "--source", write_idx_dir(tmp_path / "b", seed=1), "--out", out)
    assert_one_line_error(code, err, "already holds another prepared dataset.*--force")
    assert np.array_equal(open_split(out).images, first)
    code, _, _ = run_cli(capsys, "prepare", "mnist", "--source", tmp_path / "b", "--out", out, "--force")
    assert code == 0 and not np.array_equal(open_split(out).images, first)


def test_prepare_again_reads_nothing_unless_the_files_changed(tmp_path, capsys, monkeypatch):
    src, out = write_idx_dir(tmp_path / "src"), tmp_path / "mnist"
    assert run_cli(capsys, "prepare", "mnist", "--source", src, "--out", out)[0] == 0

    def must_not_decode(*args):
        raise AssertionError("the source was decoded again")

    decode = sources.read_idx_source
    monkeypatch.setattr(sources, "read_idx_source", must_not_decode)
    code, stdout, _ = run_cli(capsys, "prepare", "mnist", "--source", src, "--out", out)
    assert code == 0 and "already holds this prepared dataset" in stdout
    monkeypatch.setattr(sources, "read_idx_source", decode)
    labels = src / "train-labels-idx1-ubyte.gz"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))  # the file changed
    code, _, err = run_cli(capsys, "prepare", "mnist", "--source", src, "--out", out)
    assert_one_line_error(code, err, "already holds another prepared dataset.*--force")


def _truncated_gzip(d: Path) -> Path:
    write_idx_dir(d)
    path = d / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-500])
    return d


def _wrong_magic(d: Path) -> Path:
    write_idx_dir(d)
    path = d / "train-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[2:4] = b"\x08\x03"
    path.write_bytes(gzip.compress(bytes(data)))
    return d


def _count_mismatch(d: Path) -> Path:
    write_idx_dir(d)
    labels = np.arange(29, dtype=np.uint8) % 10
    payload = struct.pack(">II", 0x801, 29) + labels.tobytes()
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(payload))
    return d


def _npz_missing(d: Path) -> Path:
    d.mkdir()
    np.savez(d / "x.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4, np.int64))
    return d / "x.npz"


def _folder(d: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    d.mkdir(exist_ok=True)
    return d


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


BAD_INPUTS = {
    "missing source": (["mnist", "--source", "{tmp}/nowhere"], lambda d: None, "is not a directory"),
    "missing file": (["mnist", "--source", "{tmp}/src"],
                     lambda d: (write_idx_dir(d), (d / "t10k-labels-idx1-ubyte.gz").unlink()),
                     "missing mnist file.*t10k-labels-idx1-ubyte"),
    "truncated gzip": (["mnist", "--source", "{tmp}/src"], _truncated_gzip, "train-images-idx3-ubyte.gz"),
    "wrong magic": (["mnist", "--source", "{tmp}/src"], _wrong_magic, "magic"),
    "count mismatch": (["mnist", "--source", "{tmp}/src"], _count_mismatch, "30 images.*29 labels|29 labels.*30 images"),
    "npz missing arrays": (["npz", "--source", "{tmp}/src/x.npz"], _npz_missing, "x_test.*y_test|missing"),
    "empty folder": (["folder", "--source", "{tmp}/src", "--size", "8"], lambda d: d.mkdir(), "empty|no image"),
    "non-image file": (["folder", "--source", "{tmp}/src", "--size", "8"],
                       lambda d: _folder(d, {"cat/a.png": _png(), "cat/b.png": _png(), "dog/c.png": _png(),
                                             "dog/d.png": _png(), "dog/notes.txt": b"hello"}),
                       "notes.txt"),
    "corrupt image": (["folder", "--source", "{tmp}/src", "--size", "8"],
                      lambda d: _folder(d, {"cat/a.png": _png(), "cat/b.png": _png()[:40], "dog/c.png": _png(),
                                            "dog/d.png": _png()}),
                      "b.png"),
    "offline, nothing found": (["cifar10", "--no-download"], lambda d: None, "not found.*download"),
    "unknown source": (["imagenet-21k"], lambda d: None, "unknown dataset source 'imagenet-21k'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    args, make, pattern = BAD_INPUTS[case]
    make(tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prepare", *[a.format(tmp=tmp_path) for a in args], "--out", out)
    assert_one_line_error(code, err, pattern)
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_out_pointing_at_a_non_dataset_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    code, _, err = run_cli(capsys, "prepare", "mnist", "--source", write_idx_dir(tmp_path / "src"), "--out", out)
    assert_one_line_error(code, err, "not an onepoch prepared dataset; refusing to overwrite")
    assert [p.name for p in out.iterdir()] == ["chapter1.tex"]


def test_views_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "views", tmp_path / "none", "--out", tmp_path / "g.png")
    assert_one_line_error(code, err, "prepared dataset not found")
    data = tmp_path / "mnist"
    run_cli(capsys, "prepare", "mnist", "--source", write_idx_dir(tmp_path / "src"), "--out", data)
    code, _, err = run_cli(capsys, "views", data, "blurp=1", "--out", tmp_path / "g.png")
    assert_one_line_error(code, err, r"unknown ViewSpec key 'blurp' \(did you mean 'blur_p'\?\)")
    code, _, err = run_cli(capsys, "views", data, "--spec", "emp_ssl_cifr", "--out", tmp_path / "g.png")
    assert_one_line_error(code, err, "unknown view preset")
    code, _, err = run_cli(capsys, "views", data, "crop_scale=[0.5,0.1]", "--out", tmp_path / "g.png")
    assert_one_line_error(code, err, "ViewSpec.crop_scale")
    assert not (tmp_path / "g.png").exists()


def test_console_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onepoch", "prepare", "mnist", "--source", str(tmp_path / "x"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("onepoch: error:") and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "onepoch", "--debug", "prepare", "mnist", "--source",
                           str(tmp_path / "x"), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_system_dir_is_patchable_for_offline_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": tmp_path / "none", "mnist": tmp_path / "none"})
    code, _, err = run_cli(capsys, "prepare", "fashion-mnist", "--no-download", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "apt-get install dataset-fashion-mnist")
