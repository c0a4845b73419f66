"""Downloading dataset files into onepoch's cache: pinned hashes, retries with back-off, resume.

The cache root is ``$ONEPOCH_CACHE``, else ``$XDG_CACHE_HOME/onepoch``, else ``~/.cache/onepoch``;
downloaded source files live in ``<cache root>/downloads/<dataset name>/``.
Setting ``ONEPOCH_OFFLINE=1`` forbids every download.

Every file is fetched against the sha256 pinned for it (in its reader module: ``onepoch.data.idx``,
``onepoch.data.cifar``), or its MD5 where MD5 is all that is published (torchvision's pins of STL-10,
Tiny ImageNet, Imagenette): a download, or a file already in the cache, whose hash differs is deleted
and reported, never used. A transfer streams into ``<file>.part``; one cut short (a dropped connection,
a read that stalls for ``timeout`` seconds, an interrupted process) is resumed from where it stopped
with an HTTP ``Range`` request, or restarted when the server does not resume. Failures that may pass
(network errors, timeouts, HTTP 408/429/5xx) are retried ``ATTEMPTS`` times in all, waiting
``BACKOFF_S``, 2x, 4x ... between tries. :class:`Archive` is the pin of an archive whose publisher
gives only an MD5. The digests themselves: :mod:`onepoch.data.checksum`.
"""

from __future__ import annotations

import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from onepoch import __version__
from onepoch.atomic import fsync_dir
from onepoch.data.checksum import file_digest
from onepoch.errors import DataError
from onepoch.progress import progress

DEFAULT_TIMEOUT_S = 60.0   # for connecting, and for each read: a transfer that stalls this long is retried
ATTEMPTS = 4               # tries per URL for failures that may pass
BACKOFF_S = 1.0            # wait before the second try; doubled before each further one
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class Archive:
    """One official archive: file name, URL, and the MD5 its publisher pins (torchvision's values; no
    sha256 is published for these files)."""

    file: str
    url: str
    md5: str


def cache_root() -> Path:
    """onepoch's cache directory (not created here)."""
    if os.environ.get("ONEPOCH_CACHE"):
        return Path(os.environ["ONEPOCH_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "onepoch"
    return Path.home() / ".cache" / "onepoch"


def download_dir(name: str) -> Path:
    """Where the downloaded source files of dataset ``name`` are kept (not created here)."""
    return cache_root() / "downloads" / name


def offline() -> bool:
    """True when ``ONEPOCH_OFFLINE`` is set to 1/true/yes/on (downloads are forbidden)."""
    return os.environ.get("ONEPOCH_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _pinned(sha256: str | None, md5: str | None) -> tuple[str, str]:
    """(algorithm, expected lowercase digest) of a pin given as exactly one of sha256 / md5."""
    if (sha256 is None) == (md5 is None):
        raise ValueError("pin a file with exactly one of sha256= or md5=")
    return ("sha256", sha256.lower()) if sha256 is not None else ("md5", md5.lower())  # type: ignore[union-attr]


def _report(message: str) -> None:
    print(f"onepoch: warning: {message}", file=sys.stderr)


def verified_file(path: str | os.PathLike, sha256: str | None = None, *, md5: str | None = None) -> Path | None:
    """``path`` if it exists with the pinned hash (``sha256``, or ``md5``); None if it does not exist.
    A file with another hash is deleted (and reported on stderr): it is never used."""
    algorithm, expected = _pinned(sha256, md5)
    path = Path(path)
    if not path.is_file():
        return None
    digest = file_digest(path, algorithm)
    if digest == expected:
        return path
    path.unlink()
    _report(f"deleted {path}: its {algorithm} {digest} is not the pinned {expected}")
    return None


class _Retry(Exception):
    """A transfer failure that may pass: try again (resuming what was received)."""


def _reason(e: BaseException) -> str:
    """A short one-line description of why a transfer failed."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
        e = e.reason  # e.g. ConnectionRefusedError, a DNS failure, a connect timeout
    if isinstance(e, TimeoutError):
        return "timed out"
    text = str(e.reason) if isinstance(e, urllib.error.URLError) else str(e)
    return " ".join(text.split()) or type(e).__name__


def _content_length(headers) -> int | None:
    value = headers.get("Content-Length")
    return int(value) if value and value.strip().isdigit() else None


def _transfer(url: str, part: Path, *, desc: str, timeout: float) -> bool:
    """Fetch ``url`` into ``part``, continuing its bytes when the server honours a ``Range`` request
    (206 from the right offset), else writing it anew. Returns whether bytes were continued. A failure
    that may pass raises :class:`_Retry` with ``part`` holding what arrived; others raise as they are."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"onepoch/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after our bytes: the part is whole (the hash will tell)
            return True
        if e.code in RETRY_STATUS:
            raise _Retry(_reason(e)) from None
        raise
    except (OSError, http.client.HTTPException) as e:  # URLError (refused, DNS, timeout) is an OSError
        raise _Retry(_reason(e)) from None
    with response:
        total = _content_length(response.headers)
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        resumed = bool(have and response.status == 206 and match and int(match[1]) == have)
        if resumed:
            total = None if match[2] == "*" else int(match[2])
        elif response.status != 200:
            part.unlink(missing_ok=True)
            raise _Retry(f"HTTP {response.status} without a usable Content-Range")
        received = have if resumed else 0
        try:
            with open(part, "ab" if resumed else "wb") as f, progress(
                    total=total, initial=received, desc=desc, unit="B", unit_scale=True, unit_divisor=1024) as bar:
                while chunk := response.read1(CHUNK_BYTES):  # what has arrived: a stall loses nothing
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise _Retry(_reason(e)) from None
    if total is not None and received != total:
        raise _Retry(f"connection closed after {received} of {total} bytes")
    return resumed


def download(url: str, dest_path: str | os.PathLike, *, sha256: str | None = None, desc: str,
             timeout: float = DEFAULT_TIMEOUT_S, md5: str | None = None) -> Path:
    """Fetch ``url`` into ``dest_path`` and check that its bytes have the sha256 ``sha256`` (or, for a
    file whose publisher gives only an MD5, the md5 ``md5``; exactly one of the two).

    The bytes stream into ``<dest>.part``; only a complete file with the right hash is renamed to
    ``dest_path`` (so it is absent or right). Failures that may pass are retried (see the module),
    resuming the part. A file with another hash is deleted and a :class:`DataError` raised (when the
    part had been resumed it is fetched once more from the start first). After the last try the
    part is kept for a later call to resume. Other failures (HTTP 404, a bad URL, a full disk) raise
    a :class:`DataError` naming the URL and the reason at once.
    """
    dest = Path(dest_path)
    part = dest.with_name(dest.name + ".part")
    algorithm, expected = _pinned(sha256, md5)
    reason = "no attempt"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                resumed = _transfer(url, part, desc=desc, timeout=timeout)
            except _Retry as e:
                reason = str(e)
                continue
            digest = file_digest(part, algorithm)
            if digest == expected:
                os.replace(part, dest)
                fsync_dir(dest.parent)
                return dest
            part.unlink()
            reason = f"its {algorithm} {digest} is not the pinned {expected}; the file was deleted"
            if not resumed:
                raise DataError(f"download of {url} failed: {reason}")
    except (OSError, ValueError, http.client.HTTPException) as e:  # permanent: HTTP 404, a bad URL, disk
        part.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed: {_reason(e)}") from None
    kept = f" ({part.stat().st_size:,} bytes kept in {part.name} to resume)" if part.exists() else ""
    raise DataError(f"download of {url} failed after {ATTEMPTS} tries: {reason}{kept}")


def download_first(urls: list[str], dest_path: str | os.PathLike, *, sha256: str | None = None, desc: str,
                   timeout: float = DEFAULT_TIMEOUT_S, md5: str | None = None) -> str:
    """:func:`download` from the first of ``urls`` (mirrors of one file) that gives the right bytes;
    returns that URL. A :class:`DataError` lists every mirror's failure."""
    failures = []
    for url in urls:
        try:
            download(url, dest_path, sha256=sha256, md5=md5, desc=desc, timeout=timeout)
            return url
        except DataError as e:
            failures.append(str(e))
    raise DataError("; ".join(failures))
