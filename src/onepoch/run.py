"""One run: its parts rebuilt from a :class:`RunConfig`, and its directory's files read back.

From the config: the device (:func:`pick_device`), the precision (:func:`use_amp`), the method module
(:func:`build_model`), the view recipe of each view group (:func:`view_specs_for`,
:func:`view_spec_for`) and the labelled splits it is evaluated on (:func:`open_eval_splits`).

From the run directory ``<train.out>/<name>/`` that :mod:`onepoch.train` writes: ``config.yaml``
(:func:`read_run_config`), ``metrics.jsonl`` (:func:`read_metrics`, and the time spent in training
steps, :func:`train_seconds` / :func:`seconds_per_patch`), ``online_probe.json``
(:func:`read_online_probe`) and the trained model of the newest checkpoint (:func:`load_trained`).
Evaluation, reports, comparisons and the Python API read runs here, never through the training loop.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from onepoch import methods
from onepoch.checkpoints import load_model_state, load_newest_checkpoint
from onepoch.data.prepared import PreparedSplit, open_split
from onepoch.errors import ConfigError
from onepoch.models import build_backbone
from onepoch.precision import native_bf16
from onepoch.runconfig import RunConfig, apply_overrides, build_config
from onepoch.views import ViewSpec, load_view_spec

# --------------------------------------------------------------------------------------------------
# Parts rebuilt from the config
# --------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """The device of ``train.device``: ``auto`` (CUDA when there is one, else the CPU) or a torch
    device name; a CUDA device on a machine without one is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device {name!r} is not a device (use auto, cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device {name!r} is not a device onepoch trains on (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device asks for cuda, but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")
    return device


def use_amp(setting: str, device: torch.device) -> bool:
    """Whether the network runs under bf16 autocast: ``bf16`` on any device (the CPU too, which is how
    the tests exercise the GPU's autocast path), ``auto`` on CUDA only, ``off`` never.

    The precision policy: views and every augmentation in float32 outside autocast; autocast only
    around the network; losses in float32 (each loss function turns autocast off for its maths)."""
    return setting == "bf16" or (setting == "auto" and device.type == "cuda")


def eval_amp(config: RunConfig, device: torch.device) -> bool:
    """Whether evaluation embeds under bf16 autocast (``eval.amp``): ``bf16`` always, ``off`` never, ``auto``
    when training's precision on ``device`` is bf16 (:func:`use_amp`), or when ``train.amp`` is ``auto`` and
    ``device`` is a CPU that runs bf16 natively (:func:`onepoch.precision.native_bf16`)."""
    setting = config.eval.amp
    if setting != "auto":
        return setting == "bf16"
    return use_amp(config.train.amp, device) or (
        config.train.amp == "auto" and device.type == "cpu" and native_bf16(device))


def eval_max_patches(config: RunConfig, device: torch.device) -> int:
    """``eval.max_patches``, or when it is unset 8192 on CUDA and 1024 elsewhere."""
    if config.eval.max_patches is not None:
        return config.eval.max_patches
    return 8192 if device.type == "cuda" else 1024


def build_model(config: RunConfig, in_chans: int) -> nn.Module:
    """The method module (backbone + heads) described by the config."""
    backbone = build_backbone(config.model.arch, stem=config.model.stem, width=config.model.width,
                              in_chans=in_chans)
    return methods.get(config.method["name"]).module_class(backbone, config.method_config)


def view_specs_for(config: RunConfig, mean: list[float], std: list[float]) -> list[ViewSpec]:
    """The run's ViewSpec of each view group (``config.view_specs``); the dataset's channel mean/std
    normalise the views unless the recipe sets them."""
    return [spec if spec.mean is not None else load_view_spec(spec, {"mean": list(mean), "std": list(std)})
            for spec in config.view_specs]


def view_spec_for(config: RunConfig, mean: list[float], std: list[float], count: int | None = None) -> ViewSpec:
    """The first view group's ViewSpec (the training-size views, which evaluation and the online
    probe use), with ``count`` views when given."""
    spec = view_specs_for(config, mean, std)[0]
    return spec if count is None else load_view_spec(spec, {"count": count})


def open_eval_splits(config: RunConfig) -> tuple[PreparedSplit, PreparedSplit]:
    """The (train, test) splits the run's representation is evaluated on: ``data.train_split`` and
    ``data.test_split``, each cut to ``data.limit`` / ``data.test_limit``; both must be labelled. Both are
    verified against their meta.json first (bounded: see onepoch.data.checksum.check_stamp)."""
    def opened(name: str) -> PreparedSplit:  # an unlabelled split is refused before the next one is opened
        split = open_split(Path(config.data.root), name, image_size=config.data.image_size, verify=True)
        if split.meta.get("labelled") is False:
            raise ConfigError(f"split {split.split!r} of {config.data.root} has no real labels, so probes cannot be "
                              f"trained or tested on it; evaluate on labelled splits: onepoch eval RUN "
                              f"data.train_split=<a labelled split> (e.g. data.train_split=train for STL-10), or "
                              f"data.root=<a labelled prepared dataset of the same image size>; onepoch embed RUN "
                              f"--data DIR --out FILE.npy writes features without labels")
        return split

    train_split, test_split = opened(config.data.train_split), opened(config.data.test_split)
    if config.data.limit is not None and config.data.limit < train_split.num_images:
        train_split = train_split.subset(config.data.limit)
    if config.data.test_limit is not None and config.data.test_limit < test_split.num_images:
        test_split = test_split.subset(config.data.test_limit)
    return train_split, test_split


# --------------------------------------------------------------------------------------------------
# The run directory's files
# --------------------------------------------------------------------------------------------------


def config_to_yaml(config: RunConfig) -> str:
    """The text of a run's ``config.yaml``."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The checked config of the run in ``run_dir`` (its ``config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    return build_config(data)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of the run's ``metrics.jsonl``, one per step: ``step``, ``epoch``, ``loss`` and its
    parts, ``lr``, ``patches_per_s``, ``time`` (and the online probe's batch loss and accuracy). A
    line cut short by a crash is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ConfigError(f"{run_dir} has no metrics.jsonl (was it trained?)")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return rows


def train_seconds(run_dir: str | os.PathLike, patches_per_step: int) -> float:
    """Seconds spent in training steps, summed from the run's metrics.jsonl (survives resumes)."""
    return sum(patches_per_step / row["patches_per_s"] for row in read_metrics(run_dir) if row.get("patches_per_s"))


def seconds_per_patch(run_dir: str | os.PathLike, skip: int = 3) -> float:
    """Median seconds per patch (``1 / patches_per_s``) of the run's timed steps, the first ``skip`` left
    out; times the patches per step, the seconds per step."""
    timed = [row for row in read_metrics(run_dir) if row.get("patches_per_s")]
    if not timed:
        raise ConfigError(f"{Path(run_dir) / 'metrics.jsonl'} has no timed steps")
    return statistics.median([1.0 / row["patches_per_s"] for row in timed[skip:] or timed])


def read_online_probe(run_dir: str | os.PathLike) -> float | None:
    """The online probe's test accuracy at the end of training (``online_probe.json``); None when the
    run has none."""
    path = Path(run_dir) / "online_probe.json"
    return json.loads(path.read_text(encoding="utf-8"))["test_acc"] if path.exists() else None


@dataclass
class TrainedRun:
    """A run read back to be evaluated or reported on (see :func:`load_trained`)."""

    run_dir: Path
    config: RunConfig              # its config.yaml, with the overrides applied
    train_split: PreparedSplit     # the splits of :func:`open_eval_splits`
    test_split: PreparedSplit
    checkpoint: Path | None        # the newest checkpoint; None when none was written yet
    step: int                      # the checkpoint's step (0 without one)
    model: nn.Module | None        # the method module with the checkpoint's weights, on the CPU


def load_trained(run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainedRun:
    """The run in ``run_dir`` with dotted ``overrides`` applied to its config (``{"eval.probes": [...]}``,
    ``{"data.root": ...}``): its evaluation splits and, from its newest checkpoint, its trained model (a
    checkpoint of another model is a ConfigError naming the file)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if overrides:
        config = build_config(apply_overrides(config.to_dict(), overrides))
    train_split, test_split = open_eval_splits(config)
    newest = load_newest_checkpoint(run_dir)  # a damaged newer checkpoint is skipped with a warning
    if newest is None:
        return TrainedRun(run_dir, config, train_split, test_split, None, 0, None)
    checkpoint, state = newest
    model = build_model(config, train_split.shape[-1])
    load_model_state(model, state, checkpoint)
    return TrainedRun(run_dir, config, train_split, test_split, checkpoint, int(state["step"]), model)
