"""A lock per comparison cell, so that several ``onepoch compare`` processes can share one comparison
directory: each runs the cells that no other live process holds.

The lock is an advisory ``flock`` on a small file (``<dir>/locks/<cell>.lock``). The kernel drops it
when its process ends, however it ends (SIGKILL included), so a killed comparison leaves no stale
lock behind. The file holds the owner's host and pid, for the message of a process that finds the
lock held. Where ``fcntl`` does not exist (Windows) cells are not locked: run one process per
directory there.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def _owner(fd: int) -> dict[str, Any]:
    """The record in a held lock file ({} when its owner has not written it yet)."""
    try:
        raw = os.pread(fd, 4096, 0)
        owner = json.loads(raw.decode("utf-8")) if raw else {}
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


@contextlib.contextmanager
def cell_lock(path: Path, *, wait: bool = False) -> Iterator[dict[str, Any] | None]:
    """``with cell_lock(path) as owner``: ``owner`` is None when this process holds the lock for the
    block (released at its end), else the record (host, pid) of the process that holds it. ``wait``:
    block until the lock is free instead (``owner`` is then always None)."""
    if fcntl is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield _owner(fd)
            return
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        try:
            yield None
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def describe_owner(owner: dict[str, Any]) -> str:
    """``pid 123 on host`` for a lock's record, or ``another process`` when it has none."""
    if owner.get("pid") is None:
        return "another process"
    return f"pid {owner['pid']} on {owner.get('host', '?')}"
