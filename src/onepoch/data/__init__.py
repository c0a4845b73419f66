"""Datasets: sources (IDX, CIFAR, image folders, npz) -> prepared datasets on disk -> device loader."""

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
