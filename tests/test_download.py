"""Downloads you can trust: pinned sha256, resume, retries with back-off, bounded stalls, offline.

A local HTTP server on 127.0.0.1 serves good, truncated, wrong-hash and slow files; every test is
bounded in time (a stalled response waits on an event the fixture sets at teardown).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_source_cifar import fake_cifar, write_archive
from test_source_idx import STEMS, make_idx_dir

from onepoch.cli import main
from onepoch.data import download as dl
from onepoch.data import sources
from onepoch.data.checksum import sha256_file
from onepoch.data.sources import load_source
from onepoch.errors import DataError

PAYLOAD = bytes(range(256)) * 1200          # 300 KiB: several read chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()
HALF = len(PAYLOAD) // 2


class Server:
    """Serves ``files`` (path -> bytes) with HTTP Range support. ``behaviour`` (path -> list of modes,
    one used up per request, the last one kept) changes how a GET is answered:

    - ``good``: the file (206 and the rest of it for a ``Range: bytes=N-`` request);
    - ``cut``: promises the whole file (or the rest), sends up to its first HALF bytes and closes the
      connection;
    - ``stall``: sends up to the first HALF bytes, then waits (until the test ends) without closing;
    - ``norange``: always the whole file with 200, whatever the Range;
    - ``503``: Service Unavailable.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.behaviour: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                modes = outer.behaviour.get(self.path, ["good"])
                mode = modes.pop(0) if len(modes) > 1 else modes[0]
                data = outer.files.get(self.path)
                if data is None or mode == "503":
                    self.send_error(404 if data is None else 503)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and mode != "norange" and int(match[1]) < len(data):
                    start = int(match[1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                elif match and mode != "norange":
                    self.send_response(416)
                    self.end_headers()
                    return
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if mode in ("cut", "stall"):
                    self.wfile.write(data[start:max(start, HALF)])
                    self.wfile.flush()
                    if mode == "stall":
                        outer.release.wait(30)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """Back-off of 10 ms instead of 1 s, so retried tests stay fast (the doubling is kept)."""
    monkeypatch.setattr(dl, "BACKOFF_S", 0.01)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --- one file ------------------------------------------------------------------------------------


def test_a_good_file_is_downloaded_and_checked(tmp_path, server):
    server.files["/f"] = PAYLOAD
    dest = tmp_path / "out" / "sub" / "f.bin"
    assert dl.download(f"{server.url}/f", dest, sha256=SHA.upper(), desc="f") == dest
    assert dest.read_bytes() == PAYLOAD and leftovers(dest.parent) == ["f.bin"]
    assert server.requests == [("/f", None)]


def test_a_truncated_transfer_is_resumed_with_a_range_request(tmp_path, server):
    server.files["/f"] = PAYLOAD
    server.behaviour["/f"] = ["cut", "good"]
    dest = dl.download(f"{server.url}/f", tmp_path / "f", sha256=SHA, desc="f")
    assert dest.read_bytes() == PAYLOAD and leftovers(tmp_path) == ["f"]
    assert server.requests == [("/f", None), ("/f", f"bytes={HALF}-")]


def test_a_server_that_ignores_range_gets_a_fresh_start(tmp_path, server):
    server.files["/f"] = PAYLOAD
    (tmp_path / "f.part").write_bytes(b"x" * 1000)       # left by an earlier, interrupted run
    server.behaviour["/f"] = ["norange"]
    assert dl.download(f"{server.url}/f", tmp_path / "f", sha256=SHA, desc="f").read_bytes() == PAYLOAD
    assert server.requests == [("/f", "bytes=1000-")]


def test_a_resumed_part_with_wrong_bytes_is_fetched_again_from_the_start(tmp_path, server):
    server.files["/f"] = PAYLOAD
    (tmp_path / "f.part").write_bytes(b"x" * 1000)       # not the start of the file
    assert dl.download(f"{server.url}/f", tmp_path / "f", sha256=SHA, desc="f").read_bytes() == PAYLOAD
    assert server.requests == [("/f", "bytes=1000-"), ("/f", None)]


def test_a_whole_part_left_before_the_rename_is_completed_by_a_416(tmp_path, server):
    server.files["/f"] = PAYLOAD
    (tmp_path / "f.part").write_bytes(PAYLOAD)
    assert dl.download(f"{server.url}/f", tmp_path / "f", sha256=SHA, desc="f").read_bytes() == PAYLOAD
    assert server.requests == [("/f", f"bytes={len(PAYLOAD)}-")] and leftovers(tmp_path) == ["f"]


def test_a_file_with_the_wrong_hash_is_deleted_and_never_used(tmp_path, server):
    server.files["/f"] = PAYLOAD[::-1]
    dest = tmp_path / "f"
    with pytest.raises(DataError, match=rf"download of {server.url}/f failed: its sha256 "
                                        rf"{hashlib.sha256(PAYLOAD[::-1]).hexdigest()} is not the pinned {SHA}; "
                                        r"the file was deleted"):
        dl.download(f"{server.url}/f", dest, sha256=SHA, desc="f")
    assert leftovers(tmp_path) == [] and len(server.requests) == 1   # the same bytes again would not help


def test_a_stalled_transfer_times_out_and_resumes(tmp_path, server):
    server.files["/f"] = PAYLOAD
    server.behaviour["/f"] = ["stall", "good"]
    t0 = time.monotonic()
    assert dl.download(f"{server.url}/f", tmp_path / "f", sha256=SHA, desc="f", timeout=1.0).read_bytes() == PAYLOAD
    assert time.monotonic() - t0 < 10                          # one stall of 1 s, not the server's 30 s
    assert server.requests == [("/f", None), ("/f", f"bytes={HALF}-")]


def test_a_server_that_always_stalls_fails_in_bounded_time_and_the_next_call_resumes(tmp_path, server, monkeypatch):
    monkeypatch.setattr(dl, "ATTEMPTS", 2)
    server.files["/f"] = PAYLOAD
    server.behaviour["/f"] = ["stall"]
    t0 = time.monotonic()
    with pytest.raises(DataError, match=rf"failed after 2 tries: timed out \({HALF:,} bytes kept in f\.part"):
        dl.download(f"{server.url}/f", tmp_path / "f", sha256=SHA, desc="f", timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert leftovers(tmp_path) == ["f.part"] and (tmp_path / "f.part").read_bytes() == PAYLOAD[:HALF]
    server.behaviour["/f"] = ["good"]
    assert dl.download(f"{server.url}/f", tmp_path / "f", sha256=SHA, desc="f").read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/f", f"bytes={HALF}-")


def test_failures_that_may_pass_are_retried_with_doubling_back_off(tmp_path, server, monkeypatch):
    waits = []
    monkeypatch.setattr(dl.time, "sleep", waits.append)
    server.files["/f"] = PAYLOAD
    server.behaviour["/f"] = ["503", "503", "cut", "good"]
    assert dl.download(f"{server.url}/f", tmp_path / "f", sha256=SHA, desc="f").read_bytes() == PAYLOAD
    assert waits == [0.01, 0.02, 0.04]
    assert [r for _, r in server.requests] == [None, None, None, f"bytes={HALF}-"]


def test_http_404_is_not_retried(tmp_path, server):
    with pytest.raises(DataError, match=rf"download of {server.url}/nothing\.gz failed: HTTP 404"):
        dl.download(f"{server.url}/nothing.gz", tmp_path / "x.gz", sha256=SHA, desc="x")
    assert len(server.requests) == 1 and leftovers(tmp_path) == []


def test_connection_refused_is_retried_then_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "ATTEMPTS", 2)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=rf"download of http://127\.0\.0\.1:{port}/f failed after 2 tries: .*refused"):
        dl.download(f"http://127.0.0.1:{port}/f", tmp_path / "f", sha256=SHA, desc="f", timeout=5)
    assert leftovers(tmp_path) == []


def test_a_bad_url_is_reported_at_once(tmp_path):
    with pytest.raises(DataError, match=r"download of not-a-url failed: unknown url type"):
        dl.download("not-a-url", tmp_path / "f", sha256=SHA, desc="f")


@pytest.mark.slow
def test_a_killed_download_is_resumed_by_the_next_one(tmp_path, server):
    """A real process killed (SIGKILL) in the middle of a transfer leaves its part; the next call
    continues it with a Range request instead of starting again."""
    server.files["/f"] = PAYLOAD
    server.behaviour["/f"] = ["stall", "good"]
    dest, part = tmp_path / "f", tmp_path / "f.part"
    code = (f"from onepoch.data.download import download; "
            f"download({server.url + '/f'!r}, {str(dest)!r}, sha256={SHA!r}, desc='f', timeout=60)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "ONEPOCH_PROGRESS": "0"})
    try:
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size == HALF) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and part.stat().st_size == HALF and not dest.exists()
    assert dl.download(f"{server.url}/f", dest, sha256=SHA, desc="f").read_bytes() == PAYLOAD
    assert server.requests == [("/f", None), ("/f", f"bytes={HALF}-")]


def test_verified_file_deletes_and_reports_a_wrong_file(tmp_path, capsys):
    path = tmp_path / "f"
    assert dl.verified_file(path, SHA) is None
    path.write_bytes(PAYLOAD)
    assert dl.verified_file(path, SHA) == path
    path.write_bytes(PAYLOAD[:-1])
    assert dl.verified_file(path, SHA) is None and not path.exists()
    assert re.fullmatch(rf"onepoch: warning: deleted {re.escape(str(path))}: its sha256 \w{{64}} is not the "
                        rf"pinned {SHA}\n", capsys.readouterr().err)


# --- the datasets' download paths --------------------------------------------------------------


def test_every_official_file_has_a_pinned_sha256_and_https_comes_first():
    for name, base_urls in sources.IDX_BASE_URLS.items():
        assert set(sources.IDX_SHA256[name]) == set(STEMS.values())
        assert base_urls[0].startswith("https://")
        # the only plain-HTTP location: the official Fashion-MNIST host, which offers no HTTPS
        assert [u for u in base_urls if not u.startswith("https://")] in (
            [], ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"])
    assert set(sources.CIFAR_URLS) == set(sources.CIFAR_SHA256)
    assert all(url.startswith("https://") for url in sources.CIFAR_URLS.values())
    hashes = [*sources.CIFAR_SHA256.values(), *(h for d in sources.IDX_SHA256.values() for h in d.values())]
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes) and len(set(hashes)) == len(hashes) == 10


@pytest.fixture
def no_system_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": tmp_path / "none", "mnist": tmp_path / "none"})


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_download_skips_a_mirror_with_wrong_bytes(tmp_path, server, monkeypatch, no_system_copy, name):
    good, bad = tmp_path / "good", tmp_path / "bad"
    arrays = make_idx_dir(good, gz=True, n_train=300)        # train images > HALF bytes: "cut" cuts them
    make_idx_dir(bad, gz=True, seed=1)                       # valid IDX files, but not the official ones
    for stem in STEMS.values():
        server.files[f"/bad/{stem}.gz"] = (bad / f"{stem}.gz").read_bytes()
        server.files[f"/good/{stem}.gz"] = (good / f"{stem}.gz").read_bytes()
    server.behaviour[f"/good/{STEMS['train_images']}.gz"] = ["cut", "good"]
    monkeypatch.setitem(sources.IDX_BASE_URLS, name, (f"{server.url}/bad/", f"{server.url}/good/"))
    monkeypatch.setitem(sources.IDX_SHA256, name, {s: sha256_file(good / f"{s}.gz") for s in STEMS.values()})
    data = load_source(name)
    assert np.array_equal(data.splits["train"].images[..., 0], arrays["train_images"])
    assert np.array_equal(data.splits["test"].labels, arrays["test_labels"])
    cache = tmp_path / "cache" / "downloads" / name
    assert leftovers(cache) == sorted(f"{s}.gz" for s in STEMS.values())
    assert all((cache / f"{s}.gz").read_bytes() == (good / f"{s}.gz").read_bytes() for s in STEMS.values())
    # the wrong mirror was tried once; the good one was resumed after the cut, then tried first
    assert server.requests[:3] == [(f"/bad/{STEMS['train_images']}.gz", None),
                                   (f"/good/{STEMS['train_images']}.gz", None),
                                   (f"/good/{STEMS['train_images']}.gz", "bytes=" + str(HALF) + "-")]
    assert [p for p, _ in server.requests[3:]] == [f"/good/{s}.gz" for s in list(STEMS.values())[1:]]


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_a_wrong_idx_file_in_the_cache_is_deleted_and_fetched_again(tmp_path, server, monkeypatch, capsys,
                                                                     no_system_copy, name):
    good = tmp_path / "good"
    make_idx_dir(good, gz=True)
    for stem in STEMS.values():
        server.files[f"/good/{stem}.gz"] = (good / f"{stem}.gz").read_bytes()
    monkeypatch.setitem(sources.IDX_BASE_URLS, name, (f"{server.url}/good/",))
    monkeypatch.setitem(sources.IDX_SHA256, name, {s: sha256_file(good / f"{s}.gz") for s in STEMS.values()})
    cache = tmp_path / "cache" / "downloads" / name
    make_idx_dir(cache, gz=True, seed=5)     # a complete cache; other images (the labels are the same bytes)
    load_source(name)
    assert all((cache / f"{s}.gz").read_bytes() == (good / f"{s}.gz").read_bytes() for s in STEMS.values())
    assert capsys.readouterr().err.count("onepoch: warning: deleted") == 2
    assert sorted(p for p, _ in server.requests) == sorted(f"/good/{STEMS[k]}.gz" for k in ("train_images",
                                                                                           "test_images"))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_download_checks_the_archive(tmp_path, server, monkeypatch, capsys, name):
    from onepoch.data import cifar

    members, arrays, _ = fake_cifar(name, per_batch=40)      # an archive > HALF bytes: "cut" cuts it

    layout = cifar.LAYOUTS[name]
    archive = write_archive(tmp_path / layout.archive, layout.folder, members)
    server.files["/" + layout.archive] = archive.read_bytes()
    monkeypatch.setitem(sources.CIFAR_URLS, name, f"{server.url}/{layout.archive}")
    cache = tmp_path / "cache" / "downloads" / name
    # pinned to other bytes: refused and deleted
    monkeypatch.setitem(sources.CIFAR_SHA256, name, SHA)
    with pytest.raises(DataError, match=rf"{name}: download of .* is not the pinned {SHA}; the file was deleted; "
                                        rf"download https?://.* and pass --source PATH"):
        load_source(name)
    assert leftovers(cache) == []
    # pinned to these bytes: cut once, resumed, used
    monkeypatch.setitem(sources.CIFAR_SHA256, name, sha256_file(archive))
    server.behaviour["/" + layout.archive] = ["cut", "good"]
    assert np.array_equal(load_source(name).splits["test"].labels, arrays["test"][1])
    assert leftovers(cache) == [layout.archive] and server.requests[-1][1] is not None
    # a cached archive that is not the pinned one is deleted and fetched again
    (cache / layout.archive).write_bytes(b"not an archive")
    load_source(name)
    assert (cache / layout.archive).read_bytes() == archive.read_bytes()
    assert "onepoch: warning: deleted" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar10", "cifar100"])
def test_offline_gives_the_one_line_message(tmp_path, capsys, monkeypatch, no_system_copy, name):
    monkeypatch.setenv("ONEPOCH_OFFLINE", "1")
    assert main(["prepare", name, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"onepoch: error: {name}: ")
    assert "downloading is disabled (ONEPOCH_OFFLINE=1)" in err and "--source" in err
    assert not (tmp_path / "out").exists()
