"""A disk cache of embedded features beside a run, so that ``eval``, ``report``, ``compare`` and the demo
never embed the same thing twice.

An entry is one feature matrix (``<key>.npy``, float32, as computed) and the description it was computed
for (``<key>.json``). The description names everything the features depend on: the checkpoint (file
name, size, modification time, training step), the dataset (its ``meta.json``, which holds the arrays'
checksums, and the size and modification time of its image file), the split, the feature kind, the layer,
the view recipe (bag patches among it), the seed, the batch size (a bag draws its views per batch), the
precision and the device type. A lookup hashes the description for the file name and serves the entry
only when the stored description is equal to it; anything changed is a miss, never a stale hit.
Entries are written atomically; an unreadable entry is a miss.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onepoch.atomic import atomic_write_bytes, atomic_write_text

__all__ = ["FeatureCache", "checkpoint_identity", "split_identity"]


def _stat(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def checkpoint_identity(path: str | os.PathLike, step: int) -> dict[str, Any]:
    """What names a checkpoint file: its name, size and modification time, and its training step."""
    path = Path(path)
    return {"file": path.name, **_stat(path), "step": int(step)}


def split_identity(split) -> dict[str, Any]:
    """What names a prepared split (:class:`onepoch.data.prepared.PreparedSplit`): its directory's
    ``meta.json`` (hashed) and the size and modification time of every array file in that directory."""
    d = Path(split.root) / split.split
    meta = d / "meta.json"
    files = {p.name: _stat(p) for p in sorted(d.iterdir()) if p.is_file() and p.suffix in (".npy", ".bin")}
    return {"split": split.split, "meta_sha256": hashlib.sha256(meta.read_bytes()).hexdigest(), "files": files,
            "num_images": int(split.num_images)}


class FeatureCache:
    """Feature matrices under ``directory``, each stored with the description it was computed for;
    ``model`` (e.g. :func:`checkpoint_identity`) is part of every description."""

    def __init__(self, directory: str | os.PathLike, model: dict[str, Any]):
        self.directory = Path(directory)
        self.model = dict(model)
        self.hits = 0
        self.misses = 0

    def _paths(self, description: dict[str, Any]) -> tuple[Path, Path, str]:
        text = json.dumps({"model": self.model, **description}, sort_keys=True, default=str)
        key = hashlib.sha256(text.encode()).hexdigest()[:32]
        return self.directory / f"{key}.npy", self.directory / f"{key}.json", text

    def get(self, description: dict[str, Any]) -> torch.Tensor | None:
        """The stored features of ``description``, or None."""
        array_path, desc_path, text = self._paths(description)
        try:
            if desc_path.read_text() != text:
                return None
            return torch.from_numpy(np.load(array_path, allow_pickle=False))
        except (OSError, ValueError):
            return None

    def put(self, description: dict[str, Any], features: torch.Tensor) -> None:
        array_path, desc_path, text = self._paths(description)
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, features.detach().to("cpu", torch.float32).numpy(), allow_pickle=False)
        atomic_write_bytes(array_path, buffer.getvalue())
        atomic_write_text(desc_path, text)

    def features(self, description: dict[str, Any], compute: Callable[[], torch.Tensor],
                 device: torch.device) -> torch.Tensor:
        """The features of ``description`` on ``device``: from the cache, or computed and stored."""
        cached = self.get(description)
        if cached is not None:
            self.hits += 1
            return cached.to(device)
        self.misses += 1
        features = compute()
        self.put(description, features)
        return features
