"""The training loop shared by every method.

A run directory ``<train.out>/<name>/`` holds ``config.yaml`` (the full, checked config),
``metrics.jsonl`` (one JSON line per step: loss and its parts, lr, patches/s), ``checkpoints/``
(``step_0000100.pt`` ...: model, optimizer, step, RNG states, config; written atomically, the last
``train.keep_checkpoints`` kept) and later ``eval.json``.

A resumed run (``resume=True``) continues from the newest checkpoint with the same data order,
view randomness and schedule as an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from onepoch import __version__
from onepoch.atomic import atomic_open, atomic_write_text
from onepoch.errors import ConfigError, OnepochError
from onepoch.runconfig import RunConfig, build_config

CHECKPOINT_FORMAT = 1


class TrainingError(OnepochError):
    """Training cannot go on (a non-finite loss, a run directory in the way)."""


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device {name!r} is not a device (use auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device asks for cuda, but no CUDA device is available")
    return device


def view_specs_for(config: RunConfig, mean: list[float], std: list[float]) -> list:
    """The run's ViewSpec of each view group (one unless ``views.groups``); the dataset's channel
    mean/std normalise the views unless the recipe sets them."""
    from onepoch.runconfig import view_groups
    from onepoch.views import load_view_spec

    specs = []
    for preset, keys in view_groups(config.views):
        spec = load_view_spec(preset, keys)
        if spec.mean is None:
            spec = load_view_spec(spec, {"mean": list(mean), "std": list(std)})
        specs.append(spec)
    return specs


def view_spec_for(config: RunConfig, mean: list[float], std: list[float], count: int | None = None):
    """The first view group's ViewSpec (the training-size views, which evaluation and the online
    probe use), with ``count`` views when given."""
    from onepoch.views import load_view_spec

    spec = view_specs_for(config, mean, std)[0]
    return spec if count is None else load_view_spec(spec, {"count": count})


def make_view_groups(images: torch.Tensor, specs: list, generator: torch.Generator, *,
                     channels_last: bool) -> list[torch.Tensor]:
    """The views of a uint8 batch (B, H, W, C) for each spec: a list of (count, B, C, size, size)."""
    from onepoch.views import make_views

    b = images.shape[0]
    return [make_views(images, spec, generator, channels_last=channels_last).unflatten(0, (spec.count, b))
            for spec in specs]


def build_model(config: RunConfig, in_chans: int) -> nn.Module:
    """The method module (backbone + heads) described by the config."""
    from onepoch import methods
    from onepoch.config import dataclass_from_dict
    from onepoch.models import build_backbone

    entry = methods.get(config.method["name"])
    method_cfg = dataclass_from_dict(entry.config_class, {k: v for k, v in config.method.items() if k != "name"},
                                     where="method")
    backbone = build_backbone(config.model.arch, stem=config.model.stem, width=config.model.width,
                              in_chans=in_chans)
    return entry.module_class(backbone, method_cfg)


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    return build_config(data)


def build_online_probe(feature_dim: int, num_classes: int) -> nn.Module:
    """BatchNorm (no affine) then Linear: a linear classifier on standardised features."""
    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, num_classes))


@torch.no_grad()
def online_probe_accuracy(model: nn.Module, probe: nn.Module, split, spec, *, device: torch.device,
                          batch_size: int, seed: int, amp: bool, channels_last: bool) -> float:
    """Accuracy of the online probe on ``split``: one view per image (the training recipe, seeded)."""
    from onepoch.views import load_view_spec, make_views

    one = load_view_spec(spec, {"count": 1})
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    probe.eval()
    correct = 0
    labels = torch.from_numpy(np.array(split.labels))
    for start in range(0, split.num_images, batch_size):
        images = torch.from_numpy(np.array(split.images[start:start + batch_size])).to(device)
        views = make_views(images, one, generator, channels_last=channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            h = model.features(views)["backbone"]
        pred = probe(h.float()).argmax(1).cpu()
        correct += int((pred == labels[start:start + batch_size]).sum())
    model.train()
    probe.train()
    return correct / max(1, split.num_images)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


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
        from onepoch.errors import one_line

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


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float            # wall time of the steps run in this call
    patches_per_s: float
    final_loss: float
    model: nn.Module
    online_probe_test_acc: float | None = None  # at the end of training, one view per test image


def _prepare_run_dir(config: RunConfig, resume: bool) -> Path:
    run_dir = config.run_dir
    existing = run_dir / "config.yaml"
    if resume:
        if not existing.exists():
            raise TrainingError(f"cannot resume: {run_dir} holds no run (no config.yaml)")
        old = read_run_config(run_dir).to_dict()
        new = config.to_dict()
        diff = _config_diff(old, new)
        if diff:
            raise TrainingError(f"cannot resume {run_dir}: its config differs in {', '.join(diff[:5])}")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                            f"or choose another name=... or train.out=...")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(existing, config_to_yaml(config))
    return run_dir


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ, except those that do not change training (eval.*, and
    train.max_steps / device / threads / out)."""
    keys = []
    for k in sorted(set(old) | set(new)):
        if not prefix and k == "eval":
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b and not (prefix == "train." and k in ("max_steps", "device", "threads", "out")):
            keys.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return keys


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the metric lines of steps after ``step`` (they were run after the last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _parts_text(parts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())


def _nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an inf (none: an empty list).

    One fused norm per parameter (``torch._foreach_norm``) and a single host sync: cheap next to a step.
    A gradient so large that its norm overflows float32 counts as non-finite too.
    """
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return []
    grads = [g for _, g in named]
    foreach_norm = getattr(torch, "_foreach_norm", None)
    norms = foreach_norm(grads) if foreach_norm is not None else [g.norm() for g in grads]
    finite = torch.isfinite(torch.stack([n.float() for n in norms]))  # .float() of a float32 norm is itself
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


_OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError)


def _is_out_of_memory(e: BaseException) -> bool:
    """A device allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, _OUT_OF_MEMORY) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


def train(config: RunConfig, *, resume: bool = False, progress_bar: bool = True) -> TrainResult:
    """Train ``config`` to the end (or to ``train.max_steps``), writing the run directory."""
    from onepoch.data.loader import BatchLoader
    from onepoch.data.prepared import open_split
    from onepoch.optim import build_optimizer, set_learning_rate, warmup_cosine
    from onepoch.progress import progress

    tc = config.train
    device = pick_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    # verify: re-hash the arrays against meta.json (a damaged dataset stops here, not mid-run)
    split = open_split(Path(config.data.root), config.data.train_split, verify=True)
    if config.data.limit is not None and config.data.limit < split.num_images:
        split = split.subset(config.data.limit)
    if config.data.batch_size > split.num_images:  # checked before the run directory is created
        raise ConfigError(f"data.batch_size {config.data.batch_size} is larger than the {config.data.train_split} "
                          f"split ({split.num_images} images); use a smaller batch")
    in_chans = split.shape[-1]
    specs = view_specs_for(config, split.mean, split.std)
    run_dir = _prepare_run_dir(config, resume)

    torch.manual_seed(config.seed)
    model = build_model(config, in_chans).to(device)
    use_cl = tc.channels_last != "off"
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    amp = tc.amp == "bf16" or (tc.amp == "auto" and device.type == "cuda")
    oc = config.optim
    optimizer = build_optimizer(model.named_parameters(), oc.name, lr=oc.lr, weight_decay=oc.weight_decay,
                                momentum=oc.momentum, trust_coefficient=oc.trust_coefficient,
                                norm_bias_lr_scale=oc.norm_bias_lr_scale)
    probe = probe_opt = None
    if tc.online_probe:
        probe = build_online_probe(model.backbone.feature_dim, len(split.class_names)).to(device)
        probe_opt = torch.optim.Adam(probe.parameters(), lr=tc.online_probe_lr)
    loader = BatchLoader(split, config.data.batch_size, device=device, shuffle=True, drop_last=True,
                         seed=config.seed)
    steps_per_epoch = len(loader)
    total_steps = max(1, round(steps_per_epoch * tc.epochs))
    warmup = int(round(oc.warmup_steps * total_steps)) if oc.warmup_steps < 1 else int(oc.warmup_steps)
    view_gen = torch.Generator().manual_seed(config.seed + 1)

    step = 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        ckpt_path = latest_checkpoint(run_dir)
        if ckpt_path is not None:
            state = load_checkpoint(ckpt_path)
            load_model_state(model, state, ckpt_path)
            optimizer.load_state_dict(state["optimizer"])
            if probe is not None and state.get("probe") is not None:
                probe.load_state_dict(state["probe"])
                probe_opt.load_state_dict(state["probe_optimizer"])
            step = int(state["step"])
            view_gen.set_state(state["rng"]["views"])
            torch.set_rng_state(state["rng"]["torch"])
            if device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        _truncate_metrics(metrics_path, step)

    run_model = torch.compile(model) if tc.compile else model
    end_step = total_steps if tc.max_steps is None else min(total_steps, tc.max_steps)
    patches_per_step = config.data.batch_size * sum(spec.count for spec in specs)
    before_step = getattr(model, "before_optimizer_step", None)
    after_step = getattr(model, "after_optimizer_step", None)

    def snapshot(at: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "onepoch_version": __version__, "step": at, "total_steps": total_steps,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config.to_dict(),
            "probe": probe.state_dict() if probe is not None else None,
            "probe_optimizer": probe_opt.state_dict() if probe_opt is not None else None,
            "rng": {"views": view_gen.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        }

    model.train()
    start = time.perf_counter()
    first_step = step
    loss_value = float("nan")
    bar = progress(total=end_step, initial=step, desc=f"train {config.name}", unit="step",
                   disable=not progress_bar)
    with open(metrics_path, "a", encoding="utf-8") as metrics_file:
        while step < end_step:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            for batch in loader.epoch(epoch, start_step=in_epoch):
                if step >= end_step:
                    break
                t0 = time.perf_counter()
                lr = oc.lr * warmup_cosine(step, total_steps, warmup, oc.final_lr_ratio)
                set_learning_rate(optimizer, lr)
                try:
                    views = make_view_groups(batch.images, specs, view_gen, channels_last=use_cl)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        loss, parts, feats = run_model(views)
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        raise TrainingError(f"loss is {loss_value} at step {step} ({_parts_text(parts)}); the last "
                                            f"good checkpoint is kept in {run_dir / 'checkpoints'}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if before_step is not None:
                        before_step(step, total_steps)
                    bad = _nonfinite_gradients(model)
                    if bad:  # the optimizer has not stepped: the weights are still those of a good step
                        raise TrainingError(
                            f"non-finite gradient at step {step} (the loss is finite: {_parts_text(parts)}) in "
                            f"{len(bad)} parameter(s): {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; "
                            f"the last good checkpoint is kept in {run_dir / 'checkpoints'}")
                    optimizer.step()
                    if after_step is not None:
                        after_step(step, total_steps)
                except Exception as e:
                    if _is_out_of_memory(e):
                        raise TrainingError(
                            f"out of memory at step {step} on {device} ({config.data.batch_size} images x "
                            f"{patches_per_step // config.data.batch_size} views per step): lower data.batch_size "
                            f"or views.count; the last good checkpoint is kept in {run_dir / 'checkpoints'}"
                        ) from None
                    raise
                probe_metrics = {}
                if probe is not None:
                    first_view = feats[:batch.images.shape[0]].detach().float()
                    logits = probe(first_view)
                    probe_loss = F.cross_entropy(logits, batch.labels)
                    probe_opt.zero_grad(set_to_none=True)
                    probe_loss.backward()
                    probe_opt.step()
                    probe_metrics = {"online_probe_loss": float(probe_loss.detach()),
                                     "online_probe_acc": float((logits.argmax(1) == batch.labels).float().mean())}
                step += 1
                dt = time.perf_counter() - t0
                record = {"step": step, "epoch": epoch, "loss": loss_value,
                          **{k: float(v) for k, v in parts.items()}, **probe_metrics, "lr": lr,
                          "patches_per_s": patches_per_step / dt, "time": time.time()}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", patches_s=f"{patches_per_step / dt:,.0f}",
                                **({"probe_acc": f"{probe_metrics['online_probe_acc']:.2f}"} if probe_metrics else {}),
                                refresh=False)
                if step % tc.checkpoint_every == 0 or step == end_step:
                    save_checkpoint(run_dir, snapshot(step), tc.keep_checkpoints)
    bar.close()
    seconds = time.perf_counter() - start
    done = step - first_step
    online_acc = None
    if probe is not None and step == total_steps:
        online_acc = _online_probe_report(config, model, probe, specs[0], device, amp, use_cl, run_dir, step)
    if done == 0 and latest_checkpoint(run_dir) is None:
        save_checkpoint(run_dir, snapshot(step), tc.keep_checkpoints)
    return TrainResult(run_dir=run_dir, steps=step, seconds=seconds,
                       patches_per_s=done * patches_per_step / seconds if seconds > 0 and done else 0.0,
                       final_loss=loss_value, model=model, online_probe_test_acc=online_acc)


def _online_probe_report(config: RunConfig, model, probe, spec, device, amp: bool, channels_last: bool,
                         run_dir: Path, step: int) -> float | None:
    """Test accuracy of the online probe at the end of training, written to ``online_probe.json``."""
    from onepoch.data.prepared import open_split
    from onepoch.errors import DataError

    try:
        test = open_split(Path(config.data.root), config.data.test_split)
    except DataError:
        return None  # no test split: nothing to report
    if config.data.test_limit is not None and config.data.test_limit < test.num_images:
        test = test.subset(config.data.test_limit)
    acc = online_probe_accuracy(model, probe, test, spec, device=device, batch_size=config.eval.batch_size,
                                seed=config.eval.seed, amp=amp, channels_last=channels_last)
    atomic_write_text(run_dir / "online_probe.json",
                      json.dumps({"step": step, "split": config.data.test_split, "test_acc": acc}, indent=2) + "\n")
    return acc
