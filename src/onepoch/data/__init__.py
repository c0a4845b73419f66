"""Datasets: sources -> prepared datasets on disk -> device loader.

Sources (:mod:`onepoch.data.sources`): IDX (``fashion-mnist``, ``mnist``), ``cifar10`` / ``cifar100``,
``tiny-imagenet`` (64x64), ``stl10`` (96x96, with the unlabelled ``train+unlabeled`` split), image
``folder`` and ``npz`` are stored as raw uint8 arrays; ``imagenette`` (and ``-320`` / ``-160``),
``imagenet``, ``imagenet100``, and ``folder`` / ``npz`` with ``layout="jpeg"`` are kept as JPEG at rest
(:mod:`onepoch.data.encoded`: decoded at the scale each training step needs).
"""

from onepoch.data.loader import Batch, BatchLoader
from onepoch.data.prepared import (
    PreparedSplit,
    SourceData,
    SplitArrays,
    is_prepared,
    open_split,
    read_dataset_info,
    write_prepared,
)
from onepoch.data.sources import SOURCE_NAMES, load_source

__all__ = [
    "SOURCE_NAMES",
    "Batch",
    "BatchLoader",
    "PreparedSplit",
    "SourceData",
    "SplitArrays",
    "is_prepared",
    "load_source",
    "open_split",
    "read_dataset_info",
    "write_prepared",
]
