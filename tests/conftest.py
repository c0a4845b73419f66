"""Shared fixtures: an isolated environment for every test and a local HTTP server."""

from __future__ import annotations

import functools
import http.server
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on a machine without a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """A private download cache, progress bars off, downloads allowed, no proxies."""
    monkeypatch.setenv("ONEPOCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ONEPOCH_PROGRESS", "0")
    monkeypatch.delenv("ONEPOCH_OFFLINE", raising=False)
    for var in PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files and records the paths asked for; ``/short`` promises 1000 bytes and sends 10
    (a dropped connection)."""

    requested: list[str]

    def do_GET(self):
        self.requested.append(self.path)
        if self.path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep pytest output clean
        pass


@dataclass
class Server:
    root: Path  # files under it are served
    url: str  # base URL, no trailing slash
    requested: list[str] = field(default_factory=list)


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server in a thread, serving ``tmp_path/www``."""
    root = tmp_path / "www"
    root.mkdir()
    requested: list[str] = []
    handler = type("Handler", (_Handler,), {"requested": requested})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Server(root, f"http://127.0.0.1:{server.server_port}", requested)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
