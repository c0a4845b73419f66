"""``onepoch export``: a run's backbone for torchvision, timm, or as safetensors; and reading it back.

onepoch's ResNets use torchvision's parameter names, so the backbone (the ``backbone.`` entries of a
checkpoint's model, the online network for BYOL/ReSSL) is already a torchvision state_dict without
``fc``. timm's ``resnet18/34/50`` use the same names and shapes.

- ``torchvision`` / ``timm``: that state_dict, written with ``torch.save``; only for a ResNet-18, -34
  or -50 with the ImageNet stem, width 1 and 3 input channels, the architectures those libraries
  build. ``model.load_state_dict(sd, strict=False)`` then reports only ``fc.weight`` and ``fc.bias``
  missing.
- ``safetensors``: any onepoch backbone (CIFAR stem, any width or channels), with the constructor
  (``onepoch.models.resnet18``) and its keyword arguments in the file's metadata, and the input
  normalisation the network was trained with (mean/std per channel on the 0..1 scale) when known.

:func:`read_backbone` rebuilds an onepoch backbone from a run directory, a checkpoint, a safetensors
export, or a torchvision-style state_dict file (its architecture read from the parameter shapes).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onepoch import __version__
from onepoch.atomic import atomic_open
from onepoch.checkpoints import latest_checkpoint, load_checkpoint, load_newest_checkpoint
from onepoch.data.prepared import open_split
from onepoch.errors import ConfigError, DataError
from onepoch.models import build_backbone
from onepoch.runconfig import build_config, view_groups
from onepoch.views import load_view_spec

FORMATS = ("torchvision", "timm", "safetensors")
LIBRARY_ARCHS = ("resnet18", "resnet34", "resnet50")   # what torchvision and timm build under these names
SAFETENSORS_HINT = 'pip install "onepoch[export]" (or pip install safetensors)'
# (bottleneck blocks?, blocks per stage) -> onepoch constructor name
ARCH_OF_LAYOUT = {(False, (1, 1, 1, 1)): "resnet10", (False, (2, 2, 2, 2)): "resnet18",
                  (False, (3, 4, 6, 3)): "resnet34", (True, (3, 4, 6, 3)): "resnet50"}


def checkpoint_of(run: str | os.PathLike) -> Path:
    """The checkpoint to read: the newest one of a run directory, or the file itself."""
    path = Path(run)
    if path.is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise ConfigError(f"{path} has no checkpoint (is it a trained run directory?)")
        return ckpt
    if not path.is_file():
        raise ConfigError(f"{path} is neither a run directory nor a checkpoint file")
    return path


def backbone_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``backbone.`` entries of a method's state_dict, the prefix removed (contiguous CPU copies)."""
    out = {k.removeprefix("backbone."): v.detach().cpu().contiguous().clone()
           for k, v in model_state.items() if k.startswith("backbone.")}
    if not out:
        raise ConfigError("the checkpoint's model has no backbone.* parameters")
    return out


def _normalisation(config) -> dict[str, list[float]] | None:
    """The mean/std the run's (first view group's) views were normalised with: the recipe's, else its
    dataset's; None when neither is known (the dataset cannot be opened here)."""
    spec = load_view_spec(*view_groups(config.views)[0])
    if spec.mean is not None:
        return {"mean": [float(m) for m in spec.mean], "std": [float(s) for s in spec.std]}
    try:
        split = open_split(Path(config.data.root), config.data.train_split)
    except (DataError, OSError):
        return None
    return {"mean": [float(m) for m in split.mean], "std": [float(s) for s in split.std]}


def _describe(state: dict[str, Any], source: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(backbone state_dict, description) of a loaded checkpoint. The description: ``arch``, ``kwargs``
    (stem, width, in_chans: the constructor's arguments), ``source``, ``step``, ``method``,
    ``normalization`` (or None)."""
    config = build_config(state["config"])
    weights = backbone_state(state["model"])
    kwargs = {"stem": config.model.stem, "width": config.model.width, "in_chans": int(weights["conv1.weight"].shape[1])}
    return weights, {"arch": config.model.arch, "kwargs": kwargs, "source": str(source),
                     "step": int(state.get("step", 0)), "method": config.method["name"],
                     "normalization": _normalisation(config)}


def run_backbone(run: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(backbone state_dict, description) of a run directory (its newest checkpoint) or a checkpoint
    file; see :func:`_describe`."""
    path = Path(run)
    if path.is_dir():  # its newest intact checkpoint (a damaged newer one is skipped with a warning)
        newest = load_newest_checkpoint(path)
        if newest is None:
            raise ConfigError(f"{path} has no checkpoint (is it a trained run directory?)")
        return _describe(newest[1], newest[0])
    ckpt = checkpoint_of(run)
    return _describe(load_checkpoint(ckpt), ckpt)


def _library_problem(info: dict[str, Any]) -> str | None:
    """Why torchvision / timm cannot build this backbone (None: they can)."""
    kw = info["kwargs"]
    if info["arch"] not in LIBRARY_ARCHS:
        return f"{info['arch']} is not one of their ResNets ({', '.join(LIBRARY_ARCHS)})"
    if kw["stem"] != "imagenet":
        return f"the {kw['stem']} stem (3x3 conv, no max-pool) is not theirs (7x7 conv, max-pool)"
    if kw["width"] != 1:
        return f"width {kw['width']} is not theirs (1)"
    if kw["in_chans"] != 3:
        return f"{kw['in_chans']} input channel(s) are not theirs (3)"
    return None


def _write_bytes(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(data)


def safetensors_metadata(info: dict[str, Any]) -> dict[str, str]:
    """The metadata of a safetensors export (strings only, as the format requires)."""
    meta = {"format": "pt", "onepoch.version": __version__, "onepoch.constructor": f"onepoch.models.{info['arch']}",
            "onepoch.kwargs": json.dumps(info["kwargs"]), "onepoch.source": info["source"],
            "onepoch.step": str(info["step"]), "onepoch.method": info["method"]}
    if info.get("normalization"):
        meta["onepoch.normalization"] = json.dumps(info["normalization"])
    return meta


def _normalisation_hint(info: dict[str, Any]) -> str:
    """What a bare state_dict export cannot say: how the inputs were normalised in training."""
    norm = info.get("normalization")
    if not norm:
        return ("the .pth file does not keep the input normalisation, and it is unknown here (the run's dataset "
                "cannot be opened): normalise inputs as its training views were")
    return (f"the .pth file does not keep the input normalisation: feed images on the 0..1 scale normalised with "
            f"mean {norm['mean']} and std {norm['std']} (per channel)")


def export_backbone(run: str | os.PathLike, fmt: str, out: str | os.PathLike, *, force: bool = False) -> dict[str, Any]:
    """Write the backbone of ``run`` (a run directory or a checkpoint) to ``out`` in format ``fmt``
    (one of :data:`FORMATS`); return its description with ``path``, ``tensors`` and ``how_to_load``.
    An existing ``out`` is replaced only with ``force`` (and never when it is a directory)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give the file to write")
    if (out.exists() or out.is_symlink()) and not force:
        raise ConfigError(f"--out {out} already exists; pass --force to replace it")
    weights, info = run_backbone(run)
    if fmt == "safetensors":
        try:
            from safetensors.torch import save
        except ImportError:
            raise ConfigError(f"--format safetensors needs the safetensors package: {SAFETENSORS_HINT}") from None
        _write_bytes(out, save(weights, metadata=safetensors_metadata(info)))
        how = f"in Python: model = onepoch.load_backbone({str(out)!r})"
    else:
        problem = _library_problem(info)
        if problem:
            raise ConfigError(f"{fmt} has no model for this backbone: {problem}; use --format safetensors "
                              f"(onepoch.load_backbone reads it back)")
        buffer = io.BytesIO()
        torch.save(weights, buffer)
        _write_bytes(out, buffer.getbuffer())
        build = (f"torchvision.models.{info['arch']}()" if fmt == "torchvision"
                 else f"timm.create_model({info['arch']!r}, pretrained=False)")
        how = (f"in Python: model = {build}; model.load_state_dict(torch.load({str(out)!r}, weights_only=True), "
               f"strict=False)  # missing: fc.weight, fc.bias (the classifier)\n{_normalisation_hint(info)}")
    return {**info, "path": out, "format": fmt, "tensors": len(weights), "stem": info["kwargs"]["stem"],
            "how_to_load": how}


def resnet_layout(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """(onepoch constructor name, its keyword arguments) of a torchvision-style ResNet state_dict,
    read from the parameter names and shapes: the blocks per stage and their kind, the stem's kernel
    (7: ImageNet, 3: CIFAR), its output channels / 64 (the width) and input channels."""
    if "conv1.weight" not in state:
        raise ConfigError("not a ResNet state_dict (no conv1.weight)")
    out_ch, in_ch, k, _ = state["conv1.weight"].shape
    counts = tuple(len({key.split(".")[1] for key in state if key.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    arch = ARCH_OF_LAYOUT.get((bottleneck, counts))
    if arch is None or k not in (3, 7):
        raise ConfigError(f"not a ResNet onepoch knows: {'bottleneck' if bottleneck else 'basic'} blocks {counts}, "
                          f"{k}x{k} stem")
    return arch, {"stem": "imagenet" if k == 7 else "cifar", "width": out_ch / 64, "in_chans": int(in_ch)}


def _build(arch: str, kwargs: dict[str, Any], weights: dict[str, torch.Tensor], where: str) -> nn.Module:
    model = build_backbone(arch, **kwargs)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"{where} does not fit onepoch.models.{arch}({kwargs}): {str(e).splitlines()[0]}") from None
    return model


def read_backbone(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """An onepoch backbone (CPU, train mode as built) and its description from ``path``: a run
    directory or checkpoint (the newest), a safetensors export (its metadata names the constructor),
    or a torchvision/timm-style state_dict file (``fc`` left out; the architecture read by
    :func:`resnet_layout`). The description's ``normalization`` is the input mean/std when known."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError:
            raise ConfigError(f"reading {path} needs the safetensors package: {SAFETENSORS_HINT}") from None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                weights = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{path} cannot be read as safetensors: {' '.join(str(e).split())[:200]}") from None
        constructor = meta.get("onepoch.constructor", "")
        if constructor.startswith("onepoch.models."):
            arch, kwargs = constructor.removeprefix("onepoch.models."), json.loads(meta.get("onepoch.kwargs", "{}"))
        else:
            arch, kwargs = resnet_layout(weights)
        norm = meta.get("onepoch.normalization")
        info = {"arch": arch, "kwargs": kwargs, "source": str(path),
                "normalization": json.loads(norm) if norm else None}
        return _build(arch, kwargs, weights, str(path)), info
    if path.is_dir():
        weights, info = run_backbone(path)
        return _build(info["arch"], info["kwargs"], weights, info["source"]), info
    if not path.is_file():
        raise ConfigError(f"{path} is neither a run directory, a checkpoint nor an exported backbone")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, or one that would need to run code to load
        raise ConfigError(f"{path} cannot be loaded safely: {' '.join(str(e).split())[:200]}") from None
    if isinstance(state, dict) and "model" in state and "config" in state:      # an onepoch checkpoint
        weights, info = _describe(state, path)
        return _build(info["arch"], info["kwargs"], weights, info["source"]), info
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} is not a state_dict of tensors")
    weights = {k: v for k, v in state.items() if not k.startswith("fc.")}
    arch, kwargs = resnet_layout(weights)
    return _build(arch, kwargs, weights, str(path)), {"arch": arch, "kwargs": kwargs, "source": str(path),
                                                      "normalization": None}
