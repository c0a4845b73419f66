"""Features of any images from a trained backbone, without labels (``onepoch embed``).

``embed_images(RUN, DIR, out=FILE)`` computes the backbone's features of every image of ``DIR`` and
writes them as ``FILE`` (a float32 ``.npy``, one row per image, N x D) and ``FILE`` with ``.npy``
replaced by ``.files.txt`` (one line per row: the image's path relative to ``DIR``, or
``SPLIT/INDEX`` for a prepared dataset). ``DIR`` is

- an image folder, labelled or not: every PNG/JPEG at any depth (as ``onepoch prepare folder
  --unlabelled`` lists them), each resized as ``prepare folder`` does (shorter side to the image
  size, centre crop) -- a corrupt file or a non-image is a one-line error naming it; or
- a prepared dataset (``--split``, default ``train``), read at its own resolution (a JPEG-at-rest split at
  the image size).

The image size is ``size`` if given, else the resolution of the dataset the run was trained on (its
``data.image_size``, else its ``dataset.json`` shape), else an error that asks for ``--size``. The
feature is the backbone's output on the whole image (eval's ``full`` feature), the images normalised
with the mean/std of the run's training views. ``RUN`` is anything :func:`onepoch.export.read_backbone`
reads: a run directory (its newest checkpoint), a checkpoint or an exported backbone file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onepoch.atomic import atomic_open
from onepoch.data.folder import list_unlabelled_folder, load_square_image, readable_name
from onepoch.data.prepared import is_prepared, open_split, read_dataset_info
from onepoch.errors import ConfigError, DataError, OnepochError
from onepoch.export import read_backbone
from onepoch.progress import progress
from onepoch.run import read_run_config

FILES_SUFFIX = ".files.txt"


@torch.no_grad()
def backbone_features(model: nn.Module, images, *, batch_size: int = 256, mean=None, std=None,
                      device: str | torch.device | None = None) -> torch.Tensor:
    """Features of ``images`` from ``model`` (a backbone): float32 on the CPU, one row per image.

    ``images``: uint8 (N, H, W, C) (a numpy array or tensor, as in a prepared dataset), scaled to
    [0, 1] and normalised ``(x - mean) / std`` per channel with ``mean``/``std`` if given, else the
    model's ``normalization``, else left in [0, 1]; or a float tensor (N, C, H, W), used as it is.
    Computed in batches of ``batch_size`` on ``device`` (default: where the model is), model in eval mode.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    x = images if isinstance(images, torch.Tensor) else np.asarray(images)   # a memmap stays one
    uint8 = x.dtype in (torch.uint8, np.uint8)
    if uint8:
        if x.ndim != 4:
            raise ConfigError(f"uint8 images must be (N, H, W, C), got shape {tuple(x.shape)}")
        norm = getattr(model, "normalization", None) or {}
        mean = mean if mean is not None else norm.get("mean")
        std = std if std is not None else norm.get("std")
        if (mean is None) != (std is None) or (mean is not None and not len(mean) == len(std) == x.shape[-1]):
            raise ConfigError(f"mean and std need one value per channel ({x.shape[-1]}), got {mean} and {std}")
    elif not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 4):
        raise ConfigError(f"images must be uint8 (N, H, W, C) or a float tensor (N, C, H, W), got {x.dtype} "
                          f"{tuple(x.shape)}")
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    model.eval()
    out = []
    for start in range(0, x.shape[0], batch_size):
        batch = x[start:start + batch_size]
        batch = (batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.array(batch))).to(device)
        if uint8:
            batch = batch.permute(0, 3, 1, 2).float().div(255)
            if mean is not None:
                batch = (batch - torch.tensor(mean, device=device).view(1, -1, 1, 1)) / torch.tensor(
                    std, device=device).view(1, -1, 1, 1)
        out.append(model(batch).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@dataclass
class Embedding:
    """What :func:`embed_images` returns: the features (float32 N x D), the name of each row's image, and
    the files written (None when nothing was written)."""

    features: np.ndarray
    files: list[str]
    path: Path | None = None
    files_path: Path | None = None


def files_path_for(out: str | os.PathLike) -> Path:
    """The file list written beside ``out`` (``feats.npy`` -> ``feats.files.txt``)."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".npy") + FILES_SUFFIX)


def check_out(out: str | os.PathLike, force: bool) -> Path:
    """``out`` as a Path, after refusing a name without ``.npy`` and, without ``force``, an existing file."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out}: the features are written as a .npy file; give a name ending in .npy")
    for path in (out, files_path_for(out)):
        if path.exists() and not force:
            raise ConfigError(f"{path} already exists; pass --force (force=True) to replace it")
        if path.is_dir():
            raise ConfigError(f"{path} is a directory")
    return out


def run_image_size(run: str | os.PathLike) -> int | None:
    """The resolution the run was trained at: its ``data.image_size``, else the shape of its dataset; None
    when ``run`` is not a run directory or its dataset cannot be read."""
    try:
        config = read_run_config(run)
    except (OnepochError, OSError):
        return None
    if config.data.image_size:
        return int(config.data.image_size)
    try:
        return int(read_dataset_info(config.data.root)["shape"][0])
    except (OnepochError, OSError, KeyError, IndexError, TypeError, ValueError):
        return None


def _folder_batches(root: Path, paths: list[Path], size: int, grayscale: bool, batch_size: int):
    for start in range(0, len(paths), batch_size):
        yield np.stack([load_square_image(p, size, grayscale) for p in paths[start:start + batch_size]])


def embed_images(run: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 split: str = "train", size: int | None = None, force: bool = False, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> Embedding:
    """The features of every image of ``data`` (an image folder or a prepared dataset) from the backbone of
    ``run``; written to ``out`` (``.npy``) and its file list when ``out`` is given (see the module docstring).
    Everything is checked before any image is read."""
    out_path = check_out(out, force) if out is not None else None
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"{data}: not a directory (give an image folder or a prepared dataset)")
    model, info = read_backbone(run)
    model = model.to(device).eval()
    norm = info.get("normalization") or {}
    size = size if size is not None else run_image_size(run)
    channels = int(info["kwargs"]["in_chans"])
    if is_prepared(data):
        images = open_split(data, split, verify=True, image_size=size).images
        if images.shape[-1] != channels:
            raise DataError(f"{data}/{split} has {images.shape[-1]} channel(s); the backbone takes {channels}")
        names = [f"{split}/{i}" for i in range(images.shape[0])]
        batches = (images[s:s + batch_size] for s in range(0, images.shape[0], batch_size))
    else:
        if size is None:
            raise ConfigError(f"the image size of {run} is unknown (its dataset cannot be read): give --size N")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"--size must be a positive integer, got {size!r}")
        paths = list_unlabelled_folder(data)
        root = data.expanduser().resolve()  # as list_unlabelled_folder resolves it
        names = [readable_name(p.relative_to(root).as_posix()).replace("\n", "\\n") for p in paths]  # one per line
        batches = _folder_batches(root, paths, size, channels == 1, batch_size)
    parts = []
    with progress(total=len(names), desc=f"embed {data.name}", unit="img") as bar:
        for batch in batches:
            parts.append(backbone_features(model, batch, batch_size=batch_size, mean=norm.get("mean"),
                                           std=norm.get("std"), device=device).numpy())
            bar.update(len(batch))
    features = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    if out_path is None:
        return Embedding(features, names)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_path, "wb") as f:
        np.save(f, features, allow_pickle=False)
    files_path = files_path_for(out_path)
    with atomic_open(files_path, "w") as f:
        f.write("".join(f"{name}\n" for name in names))
    return Embedding(features, names, out_path, files_path)
