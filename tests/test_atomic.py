"""Crash-safe writes: a failure leaves the previous file or directory intact."""

import os
import stat

import pytest

from onepoch.atomic import atomic_open, atomic_write_text, publish_dir, staging_dir


def test_atomic_open_replaces_only_on_success(tmp_path):
    path = tmp_path / "eval.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary left behind
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_new_files_get_the_usual_mode_and_replacements_keep_theirs(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "a.png"
        atomic_write_text(path, "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.chmod(path, 0o600)
        atomic_write_text(path, "y")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with staging_dir(tmp_path / "ds") as tmp:
            (tmp / "f").write_text("1")
            publish_dir(tmp, tmp_path / "ds")
        assert stat.S_IMODE((tmp_path / "ds").stat().st_mode) == 0o755
    finally:
        os.umask(umask)


def test_staging_dir_is_removed_on_failure(tmp_path):
    with pytest.raises(ValueError):
        with staging_dir(tmp_path / "out") as tmp:
            (tmp / "images.npy").write_bytes(b"partial")
            raise ValueError("source turned out corrupt")
    assert list(tmp_path.iterdir()) == []
