"""Batches of a prepared split, served from device memory as uint8.

A split that fits is copied once to the device (GPU or host RAM) and batches are gathered there:
the fastest loader is no loader. A split that does not fit stays a read-only memmap on disk and each
batch is gathered from it and copied over. The order of every epoch is a seeded permutation that
depends only on ``(seed, epoch)``, so an epoch can be resumed exactly at any step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from onepoch.data.encoded import EncodedImages
from onepoch.data.prepared import PreparedSplit, open_split
from onepoch.errors import ConfigError

# Use at most this fraction of free memory for a resident copy of a split.
RESIDENT_FRACTION = 0.5


@dataclass
class EncodedBatch:
    """A training batch of an encoded split, not yet decoded: this rank's rows ``index`` (b,) of the
    step's global rows ``global_index`` (b * world_size,)."""

    images: EncodedImages
    index: np.ndarray
    global_index: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index),)


@dataclass
class Batch:
    """``images`` uint8 (B, H, W, C) and ``labels`` int64 (B,) on the loader's device;
    ``indices`` (B,) int64 on the CPU: the rows of the split they came from. For an encoded
    (JPEG-at-rest) split, ``images`` is an :class:`EncodedBatch`, decoded when its views are made
    (:mod:`onepoch.views.encoded`)."""

    images: torch.Tensor | EncodedBatch
    labels: torch.Tensor
    indices: torch.Tensor


def available_memory(device: torch.device) -> int:
    """Bytes free for a resident split: free GPU memory, or MemAvailable of the host."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a permutation of ``range(num_items)`` fixed by (seed, epoch)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(num_items, generator=g)


class BatchLoader:
    """Iterate over a prepared split in batches of ``batch_size`` images.

    ``shuffle``: a new seeded permutation each epoch (else the stored order). ``drop_last``: skip a
    last incomplete batch (training). With ``world_size > 1`` each step draws one global batch of
    ``batch_size * world_size`` images and rank ``rank`` gets its own ``batch_size`` of them.
    ``resident``: keep the whole split on the device (None: when it fits in half the free memory).
    """

    def __init__(self, split: PreparedSplit | str | os.PathLike, batch_size: int, *,
                 device: str | torch.device = "cpu", shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, resident: bool | None = None,
                 split_name: str = "train") -> None:
        if not isinstance(split, PreparedSplit):
            split = open_split(Path(split), split_name)
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.split = split
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        n = split.num_images
        global_batch = batch_size * world_size
        if drop_last and global_batch > n:
            raise ConfigError(
                f"batch size {batch_size}{f' x {world_size} ranks' if world_size > 1 else ''} is larger "
                f"than the {split.split} split ({n} images); use a smaller batch"
            )
        nbytes = split.images.nbytes
        if split.encoded:  # JPEG at rest: batches are decoded per step (onepoch.views.encoded)
            resident = False
        if resident is None:
            resident = nbytes <= RESIDENT_FRACTION * available_memory(self.device)
        self.resident = resident
        self.labels = torch.from_numpy(np.array(split.labels)).to(self.device)
        if resident:
            host = torch.from_numpy(np.array(split.images))  # reads the memmap into RAM
            self.images: torch.Tensor | None = host.to(self.device) if self.device.type != "cpu" else host
        else:
            self.images = None

    @property
    def num_images(self) -> int:
        return self.split.num_images

    def __len__(self) -> int:
        """Steps per epoch."""
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            return self.num_images // global_batch
        return -(-self.num_images // global_batch)

    def order(self, epoch: int) -> torch.Tensor:
        """All indices of epoch ``epoch`` in the order they are served (before rank slicing)."""
        if self.shuffle:
            return epoch_permutation(self.num_images, self.seed, epoch)
        return torch.arange(self.num_images)

    def _gather(self, indices: torch.Tensor) -> torch.Tensor:
        if self.images is not None:
            return self.images.index_select(0, indices.to(self.images.device))
        # Out-of-core: read the rows in ascending order (sequential I/O), then restore the order.
        sorted_idx, perm = torch.sort(indices)
        rows = np.asarray(self.split.images[sorted_idx.numpy()])
        batch = torch.from_numpy(rows)[torch.argsort(perm)]
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[Batch]:
        """Yield the batches of epoch ``epoch``, starting at step ``start_step`` (exact resume:
        the batches are the same as those of a full pass from step ``start_step`` on)."""
        steps = len(self)
        if not 0 <= start_step <= steps:
            raise ConfigError(f"start step {start_step} is outside the epoch (0..{steps})")
        order = self.order(epoch)
        global_batch = self.batch_size * self.world_size
        for step in range(start_step, steps):
            chunk = order[step * global_batch:(step + 1) * global_batch]
            idx = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if self.split.encoded:
                images = EncodedBatch(self.split.images, idx.numpy(), chunk.numpy())
            else:
                images = self._gather(idx)
            yield Batch(images, self.labels.index_select(0, idx.to(self.labels.device)), idx)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)
