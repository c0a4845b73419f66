"""Downloading dataset files into onepoch's cache, with a progress bar and no partial leftovers.

The cache root is ``$ONEPOCH_CACHE``, else ``$XDG_CACHE_HOME/onepoch``, else ``~/.cache/onepoch``;
downloaded source files live in ``<cache root>/downloads/<dataset name>/``.
Setting ``ONEPOCH_OFFLINE=1`` forbids every download.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from onepoch import __version__
from onepoch.atomic import fsync_dir
from onepoch.errors import DataError
from onepoch.progress import progress

DEFAULT_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 16


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


def _failure_reason(e: BaseException) -> str:
    """A short one-line description of why a download failed."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return " ".join(str(e.reason).split()) or type(e).__name__
    return " ".join(str(e).split()) or type(e).__name__


def _content_length(headers) -> int | None:
    value = headers.get("Content-Length")
    return int(value) if value and value.strip().isdigit() else None


def download(url: str, dest_path: str | os.PathLike, *, desc: str,
             timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Fetch ``url`` into ``dest_path``: streamed to ``<dest>.part`` with a progress bar, fsynced,
    then renamed into place, so ``dest_path`` is either absent or complete.

    On any failure (network, HTTP status, short read, disk) the partial file is removed and a
    :class:`DataError` naming the URL and the reason is raised.
    """
    dest = Path(dest_path)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        request = urllib.request.Request(url, headers={"User-Agent": f"onepoch/{__version__}"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as f:
            total = _content_length(response.headers)
            received = 0
            with progress(total=total, desc=desc, unit="B", unit_scale=True,
                          unit_divisor=1024) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise OSError(f"connection closed after {received} of {total} bytes")
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, dest)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
        part.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed: {_failure_reason(e)}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return dest
