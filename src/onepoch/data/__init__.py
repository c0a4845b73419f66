"""Datasets: sources (IDX, CIFAR, image folders, npz) -> prepared datasets on disk -> device loader."""

from onepoch.data.prepared import (
    PreparedSplit,
    SourceData,
    SplitArrays,
    is_prepared,
    open_split,
    read_dataset_info,
    write_prepared,
)

__all__ = [
    "PreparedSplit",
    "SourceData",
    "SplitArrays",
    "is_prepared",
    "open_split",
    "read_dataset_info",
    "write_prepared",
]
