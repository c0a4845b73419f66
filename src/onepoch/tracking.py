"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard, when ``train.log_to`` asks for it.

``metrics.jsonl`` is always written by the trainer (``report``, ``compare`` and resume read it).
With ``train.log_to: [jsonl, tensorboard]`` a :class:`Tracker` also writes TensorBoard event files
into ``<run dir>/tensorboard/`` (``tensorboard --logdir runs``), through PyTorch's
``torch.utils.tensorboard`` writer, which needs the ``tensorboard`` package (``pip install
"onepoch[tensorboard]"``). Nothing here imports it unless asked to.

Scalars, at the training step: ``loss/<name>`` for the loss (``loss/loss``) and its parts,
``train/lr``, ``train/patches_per_s``, ``online_probe/acc`` and ``online_probe/loss``. The views grid
is the image ``views`` (step 0). The evaluation results are hyper-parameters (TensorBoard's HPARAMS
tab): the run's config, flattened, against ``eval/<feature>/<probe>`` test accuracies.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from onepoch.errors import ConfigError
from onepoch.plots import tile_mosaic
from onepoch.runconfig import LOG_TARGETS

TENSORBOARD_DIR = "tensorboard"
INSTALL_HINT = 'pip install "onepoch[tensorboard]" (or pip install tensorboard)'


def scalar_tag(key: str) -> str | None:
    """The TensorBoard tag of a ``metrics.jsonl`` key (None for step, epoch and time)."""
    if key in ("step", "epoch", "time"):
        return None
    if key in ("lr", "patches_per_s"):
        return f"train/{key}"
    if key.startswith("online_probe_"):
        return f"online_probe/{key.removeprefix('online_probe_')}"
    return f"loss/{key}"


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config dict as ``{"optim.lr": 0.3, ...}``: numbers, booleans and strings as they are,
    anything else (lists, None) as its string."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


class Tracker:
    """The extra metric sinks of one run: ``Tracker(run_dir, config.train.log_to)``.

    Without ``tensorboard`` in ``log_to`` every method does nothing (and TensorBoard is never
    imported). With it, a missing ``tensorboard`` package is a :class:`ConfigError` saying what to
    install, raised here, before anything is written (the event files are opened at the first log
    call), so a trainer can check it before it creates the run directory. ``start_step`` (may also be
    set after construction, before the first log call): the step of the checkpoint a resumed run
    continues from; the events an interrupted run wrote for later steps are dropped (TensorBoard's
    ``purge_step``). Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, run_dir: str | os.PathLike, log_to=("jsonl",), *, start_step: int = 0):
        unknown = [t for t in log_to if t not in LOG_TARGETS]
        if unknown:
            raise ConfigError(f"unknown train.log_to entry {unknown[0]!r}; choose from: {', '.join(LOG_TARGETS)}")
        self.enabled = "tensorboard" in log_to
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self.start_step = start_step
        self._writer = None
        if self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise ConfigError(f"train.log_to asks for tensorboard, which is not installed: "
                                  f"{INSTALL_HINT}") from None

    @property
    def writer(self):
        """The TensorBoard ``SummaryWriter``, opened on first use (None when not enabled)."""
        if self.enabled and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = self.start_step + 1 if self.start_step else None
            self._writer = SummaryWriter(str(self.log_dir), purge_step=purge)
        return self._writer

    def log_scalars(self, step: int, record: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` record (a step's loss, parts, lr, patches/s, online probe) as scalars
        at ``step``; non-numbers and non-finite values are left out."""
        if not self.enabled:
            return
        for key, value in record.items():
            tag = scalar_tag(key)
            if tag and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step, walltime=record.get("time"))

    def log_views(self, step: int, tiles) -> None:
        """The views grid: :func:`onepoch.views.tiles.view_tiles` output (images, then their views, in
        [0, 1]) laid out by :func:`onepoch.plots.tile_mosaic`, as the image ``views``."""
        if not self.enabled:
            return
        self.writer.add_image("views", tile_mosaic(tiles), step, dataformats="HWC")

    def log_hparams(self, config, results: dict[str, Any]) -> None:
        """The run's config (a RunConfig or its dict) as hyper-parameters, against the evaluation's test
        accuracies ``eval/<feature>/<probe>`` (``results`` as in ``eval.json``)."""
        if not self.enabled:
            return
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        metrics = {f"eval/{feature}/{probe}": float(entry[probe]["test_acc"])
                   for feature, entry in results.items() if isinstance(entry, dict)
                   for probe in ("linear", "mlp", "knn") if isinstance(entry.get(probe), dict)}
        self.writer.add_hparams(flat_hparams(data), metrics, run_name=".")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
