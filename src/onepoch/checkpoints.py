"""Checkpoints: one file per saved step in ``<run>/checkpoints/step_NNNNNNN.pt``, written atomically,
loaded with ``weights_only=True`` (tensors and plain data only, never code)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onepoch.atomic import atomic_open
from onepoch.errors import ConfigError, one_line

CHECKPOINT_FORMAT = 1



def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*.pt") if p.stem[5:].isdigit())


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step_<step>.pt`` atomically, then drop all but the newest ``keep``."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:07d}.pt"
    # Serialised in memory first: torch's zip writer would hide a failed write (a full disk) behind
    # its own RuntimeError; a plain write raises the OSError itself.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_open(path, "wb") as f:
        f.write(buffer.getbuffer())
    for old in checkpoint_paths(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data only, never code."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # a corrupt file, or one that would need to run code to load
        raise ConfigError(f"checkpoint {path} cannot be loaded safely: {one_line(e)[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise ConfigError(f"{path} is not an onepoch checkpoint")
    return state


def load_model_state(model: nn.Module, state: dict[str, Any], path: str | os.PathLike) -> None:
    """Load a checkpoint's model weights; a checkpoint of another model is a ConfigError naming the file."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ConfigError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[0]}") from None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    paths = checkpoint_paths(Path(run_dir))
    return paths[-1] if paths else None
