"""Checksums of arrays and files: the sha256 a prepared dataset's ``meta.json`` records for each array,
and the digests (sha256, or a publisher's MD5) a downloaded file is checked against."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from onepoch.errors import DataError

# How much a verification reads (see `check_stamp`): a file up to FULL_HASH_BYTES is always re-hashed in
# full; a larger one whose size and modification time are those recorded at prepare time has only
# SAMPLE_BLOCKS blocks of SAMPLE_BLOCK_BYTES re-hashed (64 MiB, spread evenly from its first to its last byte).
FULL_HASH_BYTES = 256 << 20
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 1 << 20


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


def sample_offsets(size: int) -> list[int]:
    """Where the sampled hash reads its blocks in a file of ``size`` bytes: SAMPLE_BLOCKS offsets spread
    evenly from 0 to ``size - SAMPLE_BLOCK_BYTES`` (one block, the whole file, when it is smaller)."""
    blocks, block = SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES
    if size <= block:
        return [0]
    return sorted({round(i * (size - block) / (blocks - 1)) for i in range(blocks)})


def sampled_sha256(path: str | os.PathLike) -> str:
    """sha256 of the file's size and of the blocks at :func:`sample_offsets` (at most 64 MiB read)."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(f"{size}\n".encode())
    with open(path, "rb") as f:
        for offset in sample_offsets(size):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BLOCK_BYTES))
    return digest.hexdigest()


def file_stamp(path: str | os.PathLike) -> dict[str, int | str]:
    """What a prepared split records of a large file to verify it cheaply later: its size, modification
    time and :func:`sampled_sha256`."""
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sample_sha256": sampled_sha256(path)}


def check_stamp(path: str | os.PathLike, stamp: dict | None) -> bool:
    """The cheap part of verifying ``path`` against its recorded :func:`file_stamp`: a DataError when its
    size or its sampled hash differ. Returns True when the full sha256 must be checked as well: no stamp
    recorded, a file up to :data:`FULL_HASH_BYTES`, or a modification time that changed (the file was
    written since, or copied without its times). A larger file with its recorded size and time is
    trusted after the sampled hash (a byte changed outside the sampled blocks without a change of the
    modification time, e.g. by the disk itself, goes unnoticed)."""
    if not stamp:
        return True
    st = os.stat(path)
    why = "the file changed after it was prepared; prepare it again"
    if st.st_size != stamp.get("bytes"):
        raise DataError(f"{path}: {st.st_size} bytes, meta.json recorded {stamp.get('bytes')} ({why})")
    if st.st_size <= FULL_HASH_BYTES or st.st_mtime_ns != stamp.get("mtime_ns"):
        return True
    if sampled_sha256(path) != stamp.get("sample_sha256"):
        raise DataError(f"{path}: checksum does not match meta.json ({why})")
    return False
