"""load_source dispatch and the download helper (cache location, offline switch, failures)."""

from __future__ import annotations

import socket

import pytest

from onepoch.data import download as dl
from onepoch.data.sources import SOURCE_NAMES, load_source
from onepoch.errors import DataError


def test_source_names():
    assert SOURCE_NAMES == ("fashion-mnist", "mnist", "cifar10", "cifar100", "folder", "npz")


def test_unknown_source_lists_the_valid_names():
    with pytest.raises(DataError, match=r"unknown dataset source 'imagenet' \(valid: fashion-mnist, mnist, "
                                        r"cifar10, cifar100, folder, npz\)"):
        load_source("imagenet")


@pytest.mark.parametrize("name", ["folder", "npz"])
def test_path_sources_need_a_path(name):
    with pytest.raises(DataError, match=rf"the {name} source needs a path \(--source PATH\)"):
        load_source(name)


def test_cache_location_precedence(tmp_path, monkeypatch):
    assert dl.download_dir("mnist") == tmp_path / "cache" / "downloads" / "mnist"
    monkeypatch.delenv("ONEPOCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dl.cache_root() == tmp_path / "xdg" / "onepoch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dl.cache_root() == tmp_path / "home" / ".cache" / "onepoch"


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_offline_switch(monkeypatch, value, expected):
    monkeypatch.setenv("ONEPOCH_OFFLINE", value)
    assert dl.offline() is expected


def test_download_writes_the_file_atomically(tmp_path, http_server):
    root, base = http_server.root, http_server.url
    payload = bytes(range(256)) * 1000
    (root / "blob.bin").write_bytes(payload)
    dest = tmp_path / "out" / "sub" / "blob.bin"
    assert dl.download(f"{base}/blob.bin", dest, desc="blob") == dest
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]


def test_download_http_error(tmp_path, http_server):
    base = http_server.url
    dest = tmp_path / "out" / "x.gz"
    with pytest.raises(DataError, match=rf"download of {base}/nothing\.gz failed: HTTP 404"):
        dl.download(f"{base}/nothing.gz", dest, desc="x")
    assert not dest.exists() and not dest.with_name("x.gz.part").exists()


def test_download_short_read_leaves_nothing(tmp_path, http_server):
    base = http_server.url
    dest = tmp_path / "x.bin"
    with pytest.raises(DataError, match=rf"download of {base}/short failed: "):
        dl.download(f"{base}/short", dest, desc="x")
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]


def test_download_connection_refused(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=rf"download of http://127\.0\.0\.1:{port}/f failed: .*refused"):
        dl.download(f"http://127.0.0.1:{port}/f", tmp_path / "f", desc="f", timeout=5)
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.part").exists()


def test_download_bad_url(tmp_path):
    with pytest.raises(DataError, match=r"download of not-a-url failed: unknown url type"):
        dl.download("not-a-url", tmp_path / "f", desc="f")
