"""Crash-safe file writes: write to a temporary sibling, flush + fsync, then rename over the target.

A reader sees either the old complete file or the new complete file, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file next to ``path``; on a clean exit it is fsynced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private; give it the mode a plain open() would (or the old file's).
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory below ``root`` (used before publishing a directory by rename)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _owner() -> str:
    """``HOST-PID``: who made a staging or set-aside directory (in its name), so that a later run can
    tell one left by a killed process from one a live process is still filling."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(final: str | os.PathLike) -> list[Path]:
    """Delete the staging directories (``.NAME.HOST-PID.XXXX.partial``) and set-aside old versions
    (``.NAME.old-HOST-PID``) that a killed process left beside ``final``: those made on this host by a
    process that no longer runs. A live process's, another host's, or one of unknown owner is kept.
    Returns the paths removed."""
    final = Path(final)
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:old-)?(?P<host>.+)-(?P<pid>\d+)(?:\.\w+\.partial)?$")
    removed = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for entry in entries:
        match = pattern.match(entry.name)
        if (not match or not entry.is_dir() or entry.is_symlink() or match["host"] != host
                or _alive(int(match["pid"]))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; the caller fills it and publishes it with
    :func:`publish_dir`. On an exception the staging directory is deleted and ``final`` is untouched.
    Its name holds this host and process (``.NAME.HOST-PID.XXXX.partial``): the staging directory of a
    killed run is removed by the next (:func:`remove_stale_staging`)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_owner()}.", suffix=".partial", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the published directory should not be
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written staging directory to ``final``; an existing ``final`` is replaced.

    The replaced directory is first renamed aside, so at every instant ``final`` is either the old
    complete directory, absent for a moment, or the new complete directory.
    """
    staged, final = Path(staged), Path(final)
    fsync_tree(staged)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{_owner()}")
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
