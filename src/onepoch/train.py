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


def step_view_groups(batches: list[torch.Tensor], specs: list, seed: int, first_step: int, *,
                     channels_last: bool) -> list[list[torch.Tensor]]:
    """The views of consecutive training steps, rendered in one call per view group.

    ``batches[k]`` is the uint8 batch (B, H, W, C) of step ``first_step + k``. The random parameters
    of step s, group g come from :func:`onepoch.views.seeded_generator` ``(seed, s, g)``, so the views
    of a step do not depend on how many steps are rendered together, nor on where a run resumed.
    Returns, per step, a list of (count, B, C, size, size) per group (float32, outside autocast).
    """
    from onepoch.views import apply_view_params, concat_view_params, sample_view_params, seeded_generator

    sizes = [b.shape[0] for b in batches]
    images = batches[0] if len(batches) == 1 else torch.cat(batches)
    h, w = images.shape[1], images.shape[2]
    per_step: list[list[torch.Tensor]] = [[] for _ in batches]
    for g, spec in enumerate(specs):
        params = [sample_view_params(spec, n, h, w, seeded_generator(seed, first_step + k, g))
                  for k, n in enumerate(sizes)]
        views = apply_view_params(images, concat_view_params(params, sizes), spec, channels_last=channels_last)
        for k, part in enumerate(views.split([spec.count * n for n in sizes])):
            per_step[k].append(part.unflatten(0, (spec.count, sizes[k])))
    return per_step


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


def _parts_text(parts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())


_OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError)


def _is_out_of_memory(e: BaseException) -> bool:
    """A device allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, _OUT_OF_MEMORY) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


def use_amp(setting: str, device: torch.device) -> bool:
    """Whether the network runs under bf16 autocast: ``bf16`` on any device (the CPU too, which is how
    the tests exercise the GPU's autocast path), ``auto`` on CUDA only, ``off`` never.

    The precision policy: views and every augmentation in float32 outside autocast; autocast only
    around the network; losses in float32 (each loss function turns autocast off for its maths)."""
    return setting == "bf16" or (setting == "auto" and device.type == "cuda")


def fetch_to_host(values: torch.Tensor) -> list:
    """The training loop's one device-to-host synchronisation (``values.tolist()``). The loop calls it
    when it logs (every ``train.log_every`` steps, before a checkpoint, at the end), never per step, so
    that on a GPU the host queues steps ahead of the device."""
    return values.tolist()


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


# train.* keys that do not change what is computed: a resumed run may change them
_RESUMABLE_TRAIN_KEYS = ("max_steps", "device", "threads", "out", "log_every", "view_steps")


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ, except those that do not change training (eval.*, and
    the train keys of ``_RESUMABLE_TRAIN_KEYS``)."""
    keys = []
    for k in sorted(set(old) | set(new)):
        if not prefix and k == "eval":
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b and not (prefix == "train." and k in _RESUMABLE_TRAIN_KEYS):
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


def _gradient_finiteness(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """(names of the parameters that have a gradient, a device bool per name: its gradient is finite).

    One fused norm per parameter (``torch._foreach_norm``) and no host sync: a NaN or inf anywhere
    makes the norm non-finite, and so does a gradient so large that its norm overflows float32.
    """
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return [], torch.ones(0, dtype=torch.bool)
    norms = torch._foreach_norm([g for _, g in named])
    return [name for name, _ in named], torch.isfinite(torch.stack([n.float() for n in norms]))


@dataclass
class _StepRecord:
    """What the loop keeps of one step until the next host sync (tensors stay on the device)."""

    step: int                  # 0-based
    epoch: int
    lr: float
    time: float
    keys: list[str]            # names of ``values`` after the loss
    values: torch.Tensor       # [loss, *parts, (probe loss, probe acc)], float32
    grad_names: list[str]
    grad_finite: torch.Tensor  # bool per entry of grad_names


class _StepLog:
    """The steps since the last sync, written out together.

    ``flush()`` fetches every pending value with one :func:`fetch_to_host`, stops the run at the
    first step whose loss or gradient is not finite (naming the step, the loss parts and the
    parameters), then writes one ``metrics.jsonl`` line per step (``patches_per_s`` is the mean over
    the flushed steps) and updates the progress bar."""

    def __init__(self, file, bar, *, patches_per_step: int, checkpoints: Path):
        self.file, self.bar = file, bar
        self.patches_per_step = patches_per_step
        self.checkpoints = checkpoints
        self.pending: list[_StepRecord] = []
        self.last_flush = time.perf_counter()
        self.last_loss = float("nan")

    def add(self, record: _StepRecord) -> None:
        self.pending.append(record)
        self.bar.update(1)

    def flush(self) -> None:
        if not self.pending:
            return
        # one flat tensor: the records may differ in length (a frozen parameter has no gradient)
        flat = fetch_to_host(torch.cat([t for r in self.pending for t in (r.values, r.grad_finite.float())]))
        rows, at = [], 0
        for r in self.pending:
            n = r.values.numel() + r.grad_finite.numel()
            rows.append(flat[at:at + n])
            at += n
        now = time.perf_counter()
        rate = len(self.pending) * self.patches_per_step / max(now - self.last_flush, 1e-9)
        lines = []
        for record, row in zip(self.pending, rows):
            n = len(record.keys)
            loss, parts = row[0], dict(zip(record.keys, row[1:n + 1]))
            loss_parts = {k: v for k, v in parts.items() if not k.startswith("online_probe")}
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {record.step} ({_parts_text(loss_parts)}); the last "
                                    f"good checkpoint is kept in {self.checkpoints}")
            bad = [name for name, ok in zip(record.grad_names, row[n + 1:]) if not ok]
            if bad:
                raise TrainingError(
                    f"non-finite gradient at step {record.step} (the loss is finite: {_parts_text(loss_parts)}) in "
                    f"{len(bad)} parameter(s): {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; "
                    f"the last good checkpoint is kept in {self.checkpoints}")
            lines.append(json.dumps({"step": record.step + 1, "epoch": record.epoch, "loss": loss, **parts,
                                     "lr": record.lr, "patches_per_s": rate, "time": record.time}) + "\n")
            self.last_loss = loss
        self.file.write("".join(lines))
        self.file.flush()
        postfix = {"loss": f"{self.last_loss:.3f}", "patches_s": f"{rate:,.0f}"}
        if "online_probe_acc" in parts:
            postfix["probe_acc"] = f"{parts['online_probe_acc']:.2f}"
        self.bar.set_postfix(**postfix, refresh=False)
        self.pending = []
        self.last_flush = now


def _steps(loader, step: int, end_step: int):
    """(step, batch) for the steps ``step .. end_step - 1``, across epochs."""
    per_epoch = len(loader)
    while step < end_step:
        epoch, in_epoch = divmod(step, per_epoch)
        for batch in loader.epoch(epoch, start_step=in_epoch):
            if step >= end_step:
                return
            yield step, batch
            step += 1


def _steps_with_views(steps, specs: list, seed: int, per_call: int, channels_last: bool):
    """(step, batch, view groups) with the views of ``per_call`` consecutive steps rendered per call."""
    chunk = []

    def render():
        views = step_view_groups([b.images for _, b in chunk], specs, seed, chunk[0][0], channels_last=channels_last)
        return [(s, b, v) for (s, b), v in zip(chunk, views)]

    for item in steps:
        chunk.append(item)
        if len(chunk) == per_call:
            yield from render()
            chunk = []
    if chunk:
        yield from render()


def _probe_step(probe: nn.Module, probe_opt: torch.optim.Optimizer, feats: torch.Tensor, labels: torch.Tensor
                ) -> torch.Tensor:
    """One Adam step of the online probe on the detached first-view features: returns [loss, accuracy]
    on the device (float32, outside autocast)."""
    logits = probe(feats[:labels.shape[0]].detach().float())
    loss = F.cross_entropy(logits, labels)
    probe_opt.zero_grad(set_to_none=True)
    loss.backward()
    probe_opt.step()
    return torch.stack([loss.detach(), (logits.argmax(1) == labels).float().mean()])


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
    amp = use_amp(tc.amp, device)
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
            torch.set_rng_state(state["rng"]["torch"])
            if device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        _truncate_metrics(metrics_path, step)

    run_model = torch.compile(model) if tc.compile else model
    end_step = total_steps if tc.max_steps is None else min(total_steps, tc.max_steps)
    patches_per_step = config.data.batch_size * sum(spec.count for spec in specs)
    before_step = getattr(model, "before_optimizer_step", None)
    after_step = getattr(model, "after_optimizer_step", None)
    view_steps = tc.view_steps or (4 if device.type == "cuda" else 1)

    def snapshot(at: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "onepoch_version": __version__, "step": at, "total_steps": total_steps,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config.to_dict(),
            "probe": probe.state_dict() if probe is not None else None,
            "probe_optimizer": probe_opt.state_dict() if probe_opt is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        }

    model.train()
    start = time.perf_counter()
    first_step = step
    bar = progress(total=end_step, initial=step, desc=f"train {config.name}", unit="step",
                   disable=not progress_bar)
    stream = _steps_with_views(_steps(loader, step, end_step), specs, config.seed, view_steps, use_cl)
    with open(metrics_path, "a", encoding="utf-8") as metrics_file:
        log = _StepLog(metrics_file, bar, patches_per_step=patches_per_step, checkpoints=run_dir / "checkpoints")
        while step < end_step:
            try:
                step_, batch, views = next(stream)
                assert step_ == step
                lr = oc.lr * warmup_cosine(step, total_steps, warmup, oc.final_lr_ratio)
                set_learning_rate(optimizer, lr)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss, parts, feats = run_model(views)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if before_step is not None:
                    before_step(step, total_steps)
                grad_names, grad_finite = _gradient_finiteness(model)
                optimizer.step()
                if after_step is not None:
                    after_step(step, total_steps)
                keys = list(parts)
                values = [loss.detach().float().reshape(1), torch.stack([v.float() for v in parts.values()])]
                if probe is not None:
                    keys += ["online_probe_loss", "online_probe_acc"]
                    values.append(_probe_step(probe, probe_opt, feats, batch.labels))
            except Exception as e:
                # A step after a non-finite one may fail on its NaN weights (e.g. a Cholesky): the
                # pending records name the first bad step, which is the error to report.
                log.flush()
                if _is_out_of_memory(e):
                    raise TrainingError(
                        f"out of memory at step {step} on {device} ({config.data.batch_size} images x "
                        f"{patches_per_step // config.data.batch_size} views per step): lower data.batch_size "
                        f"or views.count; the last good checkpoint is kept in {run_dir / 'checkpoints'}"
                    ) from None
                raise
            log.add(_StepRecord(step=step, epoch=step // steps_per_epoch, lr=lr, time=time.time(), keys=keys,
                                values=torch.cat(values), grad_names=grad_names, grad_finite=grad_finite))
            step += 1
            save = step % tc.checkpoint_every == 0 or step == end_step
            if save or step % tc.log_every == 0:
                log.flush()  # before a checkpoint: a non-finite step stops the run before it is saved
            if save:
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
                       final_loss=log.last_loss, model=model, online_probe_test_acc=online_acc)


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
