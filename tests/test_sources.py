"""load_source dispatch and the download helper (cache location, offline switch, failures)."""

from __future__ import annotations

import functools
import http.server
import socket
import threading

import pytest

from onepoch.data import download as dl
from onepoch.data.sources import SOURCE_NAMES, load_source
from onepoch.errors import DataError


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEPOCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ONEPOCH_PROGRESS", "0")
    monkeypatch.delenv("ONEPOCH_OFFLINE", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


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


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files; ``/short`` promises 1000 bytes and sends 10 (a dropped connection)."""

    def do_GET(self):
        if self.path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server in a thread serving tmp_path/www; yields (root dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_writes_the_file_atomically(tmp_path, http_server):
    root, base = http_server
    payload = bytes(range(256)) * 1000
    (root / "blob.bin").write_bytes(payload)
    dest = tmp_path / "out" / "sub" / "blob.bin"
    assert dl.download(f"{base}/blob.bin", dest, desc="blob") == dest
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]


def test_download_http_error(tmp_path, http_server):
    _root, base = http_server
    dest = tmp_path / "out" / "x.gz"
    with pytest.raises(DataError, match=rf"download of {base}/nothing\.gz failed: HTTP 404"):
        dl.download(f"{base}/nothing.gz", dest, desc="x")
    assert not dest.exists() and not dest.with_name("x.gz.part").exists()


def test_download_short_read_leaves_nothing(tmp_path, http_server):
    _root, base = http_server
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
