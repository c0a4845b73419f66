"""Checkpoints: one file per saved step in ``<run>/checkpoints/step_NNNNNNN.pt``, written atomically,
loaded with ``weights_only=True`` (tensors and plain data only, never code)."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onepoch.atomic import atomic_open
from onepoch.errors import ConfigError, one_line, warn

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


class DamagedCheckpoint(ConfigError):
    """A checkpoint file that cannot be read at all (truncated, emptied, not a checkpoint's zip); the
    loaders of a run directory fall back to the newest intact one (:func:`load_newest_checkpoint`)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path}: it is damaged ({reason})")
        self.path, self.reason = path, reason


def _first_sentence(e: BaseException, limit: int = 200) -> str:
    """The first sentence of an exception's message, whole (cut at a word, with '...', only past
    ``limit`` characters): torch's messages go on with advice that would cut the line mid-sentence."""
    text = one_line(e)
    sentence = text.split(". ")[0].rstrip(".") if ". " in text else text.rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data only, never code. A file
    that cannot be read is a :class:`DamagedCheckpoint`; one that would run code, a ConfigError."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():  # it would need to run code to load: refused, never skipped
            raise ConfigError(f"checkpoint {path} cannot be loaded safely: {_first_sentence(e)}") from None
        raise DamagedCheckpoint(path, _first_sentence(e)) from None
    except Exception as e:  # a truncated or corrupt file
        raise DamagedCheckpoint(path, _first_sentence(e)) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise ConfigError(f"{path} is not an onepoch checkpoint")
    return state


def load_model_state(model: nn.Module, state: dict[str, Any], path: str | os.PathLike) -> None:
    """Load a checkpoint's model weights; a checkpoint of another model is a ConfigError naming the file."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ConfigError(f"checkpoint {path} does not fit this model: {_first_problem(e)}") from None


def _first_problem(e: RuntimeError) -> str:
    """The first mismatch of load_state_dict's message (its first line is only 'Error(s) in loading
    state_dict for X:')."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else type(e).__name__
    return detail.rstrip(".")


def load_newest_checkpoint(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                           set_aside: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest checkpoint of ``run_dir`` that can be read; None when it has none.

    A damaged newer checkpoint (truncated, emptied) is skipped, with one warning line naming it, why,
    and the checkpoint used instead; with ``set_aside`` (a resumed run, which will write checkpoints
    beside it) it is renamed to ``NAME.damaged``, kept but out of the way. A checkpoint that would run
    code or does not fit is an error, never skipped. When every checkpoint is damaged: a ConfigError."""
    skipped: list[DamagedCheckpoint] = []
    for path in reversed(checkpoint_paths(Path(run_dir))):
        try:
            state = load_checkpoint(path, map_location)
        except DamagedCheckpoint as e:
            skipped.append(e)
            continue
        for bad in skipped:
            kept = ""
            if set_aside:
                aside = bad.path.with_name(bad.path.name + ".damaged")
                os.replace(bad.path, aside)
                kept = f"; renamed it to {aside.name}"
            warn(f"skipped {bad}; using {path.name} (step {int(state.get('step', 0))}), the newest intact "
                 f"checkpoint{kept}")
        return path, state
    if skipped:
        names = ", ".join(f"{e.path.name} is damaged ({e.reason})" for e in skipped)
        raise ConfigError(f"no intact checkpoint in {Path(run_dir) / 'checkpoints'}: {names}")
    return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    paths = checkpoint_paths(Path(run_dir))
    return paths[-1] if paths else None
