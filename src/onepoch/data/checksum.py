"""Checksums of arrays and files: the sha256 a prepared dataset's ``meta.json`` records for each array,
and the digests (sha256, or a publisher's MD5) a downloaded file is checked against."""

from __future__ import annotations

import hashlib
import os

import numpy as np


def array_sha256(a: np.ndarray, chunk_rows: int = 4096) -> str:
    """sha256 of an array's raw C-order bytes (chunked, so memmaps are not read into RAM at once)."""
    h = hashlib.sha256()
    for start in range(0, max(1, a.shape[0] if a.ndim else 1), chunk_rows):
        h.update(np.ascontiguousarray(a[start : start + chunk_rows] if a.ndim else a).tobytes())
    return h.hexdigest()


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The ``algorithm`` (sha256 or md5) digest of a file's bytes, as lowercase hex digits."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as 64 lowercase hex digits."""
    return file_digest(path, "sha256")
