"""Progress bars: tqdm on stderr, shown only for work that lasts more than a second.

Set ``ONEPOCH_PROGRESS=0`` to silence them (e.g. in logs).
"""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar with onepoch's defaults (1 s delay, dynamic width, off with ONEPOCH_PROGRESS=0)."""
    disable = bool(kwargs.pop("disable", False)) or os.environ.get("ONEPOCH_PROGRESS", "1") == "0"
    return tqdm(iterable, total=total, desc=desc, unit=unit, delay=1.0, dynamic_ncols=True,
                disable=disable, **kwargs)
