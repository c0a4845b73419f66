"""The training loop shared by every method: one run's steps, written into its run directory.

What a run is built from (device, precision, model, view specs) and how its files are read back
live in :mod:`onepoch.run`; this module only trains. A run directory ``<train.out>/<name>/`` holds
``config.yaml`` (the full, checked config), ``metrics.jsonl`` (one JSON line per step: loss and its
parts, lr, patches/s), ``checkpoints/`` (``step_0000100.pt`` ...: model, optimizer, step, RNG states,
config; written atomically, the last ``train.keep_checkpoints`` kept) and later ``eval.json``.

A resumed run (``resume=True``) continues from the newest checkpoint with the same data order,
view randomness and schedule as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from onepoch import __version__
from onepoch import distributed as dist_
from onepoch.atomic import atomic_write_text
from onepoch.checkpoints import (
    CHECKPOINT_FORMAT,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    load_newest_checkpoint,
    save_checkpoint,
)
from onepoch.data.loader import BatchLoader
from onepoch.data.prepared import open_split, read_dataset_info
from onepoch.errors import ConfigError, DataError, OnepochError, one_line
from onepoch.optim import build_optimizer, set_learning_rate, warmup_cosine
from onepoch.progress import progress
from onepoch.run import (
    build_model,
    config_to_yaml,
    pick_device,
    read_metrics,
    read_run_config,
    use_amp,
    view_specs_for,
)
from onepoch.runconfig import RunConfig, build_config
from onepoch.tracking import Tracker
from onepoch.views import load_view_spec, make_views
from onepoch.views.stream import steps_with_views
from onepoch.views.tiles import run_view_tiles


class TrainingError(OnepochError):
    """Training cannot go on (a non-finite loss, a run directory in the way)."""


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def build_online_probe(feature_dim: int, num_classes: int) -> nn.Module:
    """BatchNorm (no affine) then Linear: a linear classifier on standardised features."""
    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, num_classes))


@torch.no_grad()
def online_probe_accuracy(model: nn.Module, probe: nn.Module, split, spec, *, device: torch.device,
                          batch_size: int, seed: int, amp: bool, channels_last: bool) -> float:
    """Accuracy of the online probe on ``split``: one view per image (the training recipe, seeded)."""
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


def _parts_text(parts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())


_OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError)


def _is_out_of_memory(e: BaseException) -> bool:
    """A device allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, _OUT_OF_MEMORY) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


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
    patches_per_s: float      # over all processes
    final_loss: float
    model: nn.Module
    online_probe_test_acc: float | None = None  # at the end of training, one view per test image
    main: bool = True         # rank 0 (the process that wrote the files)
    already_trained: bool = False  # resumed with no step left to run: nothing was trained or written


RESUME_MODES = ("off", "on", "auto")
# train.* keys that do not change what is computed: a resumed run may change them
_RESUMABLE_TRAIN_KEYS = ("max_steps", "device", "threads", "out", "log_every", "view_steps", "resume", "backend",
                         "log_to")


def _open_run_dir(config: RunConfig, resume: str) -> bool:
    """Check (and for a new run create) the run directory; True when there is a run to resume.

    ``resume``: ``off`` (a new run; an existing run directory is an error), ``on`` (the run must
    exist, with the same config up to the keys that do not change training) or ``auto`` (continue the
    run when its directory holds one, from its newest checkpoint or from the start, else start it).
    Only rank 0 looks at the disk; every rank gets its answer (or its error), so they all stop or go
    on together."""
    def decide() -> tuple[bool, str | None]:
        run_dir = config.run_dir
        existing = run_dir / "config.yaml"
        if resume == "on" or (resume == "auto" and existing.exists()):
            if not existing.exists():
                return False, f"cannot resume: {run_dir} holds no run (no config.yaml)"
            diff = _config_diff(read_run_config(run_dir).to_dict(), config.to_dict())
            if diff:
                return False, f"cannot resume {run_dir}: its config differs in {', '.join(diff[:5])}"
            return True, None
        if run_dir.exists() and any(run_dir.iterdir()):
            return False, (f"run directory {run_dir} already exists; pass --resume to continue it, "
                           f"or choose another name=... or train.out=...")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(existing, config_to_yaml(config))
        return False, None

    world = dist_.launched_world()
    try:
        answer = decide() if world.main else None
    except OnepochError as e:
        answer = (False, str(e))
    resuming, error = dist_.broadcast_object(answer)
    if error is not None:
        raise TrainingError(error)
    return resuming


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
    """Drop the metric lines of steps after ``step`` (they were run after the last checkpoint), and
    any line cut short by a crash."""
    if not path.exists():
        return
    kept = []
    for row in read_metrics(path.parent):
        try:
            if row["step"] <= step:
                kept.append(row)
        except (KeyError, TypeError):
            continue  # not a step's line
    atomic_write_text(path, "".join(f"{json.dumps(row)}\n" for row in kept))


def _finiteness(named: list[tuple[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """(the names, a device bool per name: that tensor's 2-norm is finite).

    One fused norm per tensor (``torch._foreach_norm``) and no host sync. A NaN or inf anywhere makes
    the norm non-finite, and so do values so large (about 1e19 and up) that the norm overflows float32:
    numbers that have blown up as surely. (The max-abs norm, exact, costs 13x as much on the CPU.)
    """
    if not named:
        return [], torch.ones(0, dtype=torch.bool)
    norms = torch._foreach_norm([t for _, t in named])
    return [name for name, _ in named], torch.isfinite(torch.stack([n.float() for n in norms]))


def _gradient_finiteness(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """(names of the parameters that have a gradient, a device bool per name: its gradient is finite)."""
    return _finiteness([(name, p.grad) for name, p in model.named_parameters() if p.grad is not None])


def _state_finiteness(run: "_Run") -> tuple[list[str], torch.Tensor]:
    """(names of every floating-point tensor a checkpoint saves of the model and the online probe, the
    parameters and the buffers (BatchNorm's running statistics, EMA targets, queues), a device bool per
    name: it is finite). Checked after every step, so that no checkpoint keeps a non-finite tensor and
    the step that made it so is named."""
    modules = [("", run.model)] + ([("probe.", run.probe)] if run.probe is not None else [])
    named = [(prefix + name, t.detach()) for prefix, module in modules
             for name, t in [*module.named_parameters(), *module.named_buffers()]
             if t.is_floating_point() and t.numel()]
    return _finiteness(named)


def _linalg_text(e: BaseException) -> str:
    """``linalg.cholesky: (Batch element 0): The factorization could not be completed because ... .``
    -> ``linalg.cholesky: the factorization could not be completed because ...`` (first sentence)."""
    text = re.sub(r"\(Batch element \d+\): ", "", one_line(e)).split(". ")[0].rstrip(".")
    return text[:160]


def _is_linear_algebra_failure(e: BaseException) -> bool:
    """A factorisation that failed on its numbers (a Cholesky of a matrix that is not positive-definite:
    what TCR's log-determinant meets once the embeddings blow up)."""
    return isinstance(e, getattr(torch.linalg, "LinAlgError", ())) or (
        isinstance(e, RuntimeError) and str(e).startswith("linalg."))


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
    state_names: list[str]
    state_finite: torch.Tensor  # bool per entry of state_names: after the step


class _StepLog:
    """The steps since the last sync, written out together.

    ``flush()`` fetches every pending value with one :func:`fetch_to_host`, stops the run at the
    first step whose loss, gradient or resulting weights and buffers are not finite (naming the step as
    ``metrics.jsonl`` numbers it, the loss parts and the tensors; the good steps before it are written),
    then writes one ``metrics.jsonl`` line per step (``patches_per_s`` is the mean over the flushed
    steps) and updates the progress bar."""

    def __init__(self, file, bar, tracker, *, patches_per_step: int, checkpoints: Path):
        self.file, self.bar = file, bar  # file: None on ranks other than 0
        self.tracker = tracker  # onepoch.tracking.Tracker: TensorBoard when train.log_to asks for it
        self.patches_per_step = patches_per_step
        self.checkpoints = checkpoints
        self.pending: list[_StepRecord] = []
        self.last_flush = time.perf_counter()
        self.last_loss = float("nan")

    def add(self, record: _StepRecord) -> None:
        self.pending.append(record)
        self.bar.update(1)

    def _problem(self, record: _StepRecord, row: list[float], loss: float, parts: dict[str, float]) -> str | None:
        """Why this step's numbers stop the run (None: they are all finite), naming the step as
        ``metrics.jsonl`` numbers it."""
        n = len(record.keys)
        loss_parts = {k: v for k, v in parts.items() if not k.startswith("online_probe")}
        number = record.step + 1
        kept = f"the last good checkpoint is kept in {self.checkpoints}"
        if not math.isfinite(loss):
            return f"loss is {loss} at step {number} ({_parts_text(loss_parts)}); {kept}"
        grads = row[n + 1:n + 1 + len(record.grad_names)]
        bad = [name for name, ok in zip(record.grad_names, grads) if ok < 1]  # < 1: not finite on some rank
        if bad:
            return (f"non-finite gradient at step {number} (the loss is finite: {_parts_text(loss_parts)}) in "
                    f"{len(bad)} parameter(s): {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; {kept}")
        states = row[n + 1 + len(record.grad_names):]
        bad = [name for name, ok in zip(record.state_names, states) if ok < 1]
        if bad:
            return (f"non-finite (or overflowing) weights or buffers after step {number} (its loss and gradients "
                    f"are finite: {_parts_text(loss_parts)}; the numbers overflowed, lower optim.lr) in {len(bad)} tensor(s): "
                    f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; {kept}")
        return None

    def flush(self) -> None:
        if not self.pending:
            return
        # one flat tensor: the records may differ in length (a frozen parameter has no gradient); the
        # mean over ranks: the loss and gradients are the same on every rank, the probe's numbers are not
        flat = torch.cat([t for r in self.pending for t in (r.values, r.grad_finite.float(), r.state_finite.float())])
        flat = fetch_to_host(dist_.mean_over_ranks(flat))
        rows, at = [], 0
        for r in self.pending:
            n = r.values.numel() + r.grad_finite.numel() + r.state_finite.numel()
            rows.append(flat[at:at + n])
            at += n
        now = time.perf_counter()
        rate = len(self.pending) * self.patches_per_step / max(now - self.last_flush, 1e-9)
        lines, problem = [], None
        for record, row in zip(self.pending, rows):
            n = len(record.keys)
            loss, parts = row[0], dict(zip(record.keys, row[1:n + 1]))
            problem = self._problem(record, row, loss, parts)
            if problem:
                break  # the good steps before it are still written: metrics.jsonl ends just before the step named
            entry = {"step": record.step + 1, "epoch": record.epoch, "loss": loss, **parts, "lr": record.lr,
                     "patches_per_s": rate, "time": record.time}
            lines.append(json.dumps(entry) + "\n")
            self.tracker.log_scalars(entry["step"], entry)
            self.last_loss = loss
        if self.file is not None:
            self.file.write("".join(lines))
            self.file.flush()
        if problem:
            raise TrainingError(problem)
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


@dataclass
class _Run:
    """Everything a run is built from, made before any file is written (a bad config stops here)."""

    config: RunConfig
    world: Any
    device: torch.device
    split: Any
    specs: list
    model: nn.Module           # the method module (what checkpoints hold)
    net: nn.Module             # what the step calls: the model, wrapped in DDP / torch.compile
    optimizer: torch.optim.Optimizer
    probe: nn.Module | None
    probe_net: nn.Module | None
    probe_opt: torch.optim.Optimizer | None
    loader: Any
    total_steps: int
    schedule_steps: int        # the steps the learning-rate schedule spans (optim.schedule_epochs)
    warmup: int
    amp: bool
    channels_last: bool

    @property
    def patches_per_step(self) -> int:
        return self.config.data.batch_size * sum(spec.count for spec in self.specs)


def _check_batch(config: RunConfig, split, world) -> int:
    """This rank's share of ``data.batch_size`` (the global batch)."""
    batch = config.data.batch_size
    if batch % world.size:
        raise ConfigError(f"data.batch_size {batch} (the global batch) is not divisible by the {world.size} "
                          f"processes; use a multiple of {world.size}")
    if batch > split.num_images:
        raise ConfigError(f"data.batch_size {batch} is larger than the {config.data.train_split} "
                          f"split ({split.num_images} images); use a smaller batch")
    if batch // world.size < 2:  # BatchNorm of one row fails in training; contrastive losses need negatives
        raise ConfigError(f"data.batch_size {batch} gives {batch // world.size} image per process and step; "
                          f"BatchNorm and the losses need at least 2: use data.batch_size={2 * world.size} or more")
    return batch // world.size


def _check_same_config(config: RunConfig) -> None:
    """Every rank must train the same config (launched with the same recipe and overrides)."""
    mine = config_to_yaml(config)
    configs = dist_.all_gather_objects(mine)
    differing = [rank for rank, text in enumerate(configs) if text != configs[0]]
    if differing:
        diff = _config_diff(build_config(yaml.safe_load(configs[0])).to_dict(),
                            build_config(yaml.safe_load(configs[differing[0]])).to_dict())
        raise ConfigError(f"the processes were given different configs: rank {differing[0]} differs from rank 0 in "
                          f"{', '.join(diff[:3]) or 'keys that do not change training'}")


def _build(config: RunConfig, world) -> _Run:
    tc, oc = config.train, config.optim
    device = pick_device(tc.device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    dist_.start(world, tc.backend, device.type)
    _check_same_config(config)
    # verify: re-hash the arrays against meta.json (a damaged dataset stops here, not mid-run); the test
    # split too when the online probe will be tested on it (bounded: see onepoch.data.checksum.check_stamp)
    split = open_split(Path(config.data.root), config.data.train_split, verify=True,
                       image_size=config.data.image_size)
    labelled = split.meta.get("labelled", True) is not False
    if tc.online_probe and not labelled:
        raise ConfigError(f"the {config.data.train_split} split of {config.data.root} has no labels (its meta.json "
                          "says \"labelled\": false), so the online probe cannot learn: set train.online_probe=false")
    with_probe = labelled if tc.online_probe is None else tc.online_probe  # null: on for a labelled split
    if not labelled and tc.online_probe is None and world.main:
        print(f"onepoch: the {config.data.train_split} split of {config.data.root} is unlabelled: training "
              "without the online probe", file=sys.stderr, flush=True)
    if with_probe and config.data.test_split in read_dataset_info(config.data.root).get("splits", []):
        open_split(Path(config.data.root), config.data.test_split, verify=True, image_size=config.data.image_size)
    if config.data.limit is not None and config.data.limit < split.num_images:
        split = split.subset(config.data.limit)
    per_rank = _check_batch(config, split, world)
    specs = view_specs_for(config, split.mean, split.std)

    torch.manual_seed(config.seed)
    model = build_model(config, split.shape[-1]).to(device)
    use_cl = tc.channels_last != "off"
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    probe = build_online_probe(model.backbone.feature_dim, len(split.class_names)).to(device) \
        if with_probe else None
    if world.size > 1 and config.model.sync_bn:
        model = dist_.convert_sync_batchnorm(model, device.type)
        probe = dist_.convert_sync_batchnorm(probe, device.type) if probe is not None else None
    optimizer = build_optimizer(model.named_parameters(), oc.name, lr=oc.lr, weight_decay=oc.weight_decay,
                                momentum=oc.momentum, trust_coefficient=oc.trust_coefficient,
                                norm_bias_lr_scale=oc.norm_bias_lr_scale)
    probe_opt = torch.optim.Adam(probe.parameters(), lr=tc.online_probe_lr) if probe is not None else None
    net, probe_net = model, probe
    if world.size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
        probe_net = DistributedDataParallel(probe, device_ids=ids) if probe is not None else None
    if tc.compile:
        net = torch.compile(net)
    loader = BatchLoader(split, per_rank, device=device, shuffle=True, drop_last=True, seed=config.seed,
                         rank=world.rank, world_size=world.size)
    total_steps = max(1, round(len(loader) * tc.epochs))
    schedule_steps = total_steps if oc.schedule_epochs is None else max(1, round(len(loader) * oc.schedule_epochs))
    warmup = int(round(oc.warmup_steps * schedule_steps)) if oc.warmup_steps < 1 else int(oc.warmup_steps)
    return _Run(config, world, device, split, specs, model, net, optimizer, probe, probe_net, probe_opt, loader,
                total_steps, schedule_steps, warmup, use_amp(tc.amp, device), use_cl)


def _snapshot(run: _Run, step: int) -> dict[str, Any]:
    """The checkpoint of ``run`` after ``step`` steps."""
    return {
        "format": CHECKPOINT_FORMAT, "onepoch_version": __version__, "step": step, "total_steps": run.total_steps,
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "config": run.config.to_dict(),
        "probe": run.probe.state_dict() if run.probe is not None else None,
        "probe_optimizer": run.probe_opt.state_dict() if run.probe_opt is not None else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None},
    }


def _restore(run: _Run) -> int:
    """Load the newest checkpoint into ``run`` (every rank reads the same file); returns its step."""
    choice, state = None, None  # rank 0 chooses: None (no checkpoint), ("path", Path) or ("error", message)
    if run.world.main:  # a damaged newer checkpoint is skipped with a warning and set aside (NAME.damaged)
        try:
            newest = load_newest_checkpoint(run.config.run_dir, set_aside=True)
        except OnepochError as e:
            choice = ("error", str(e))
        else:
            if newest is not None:
                (path, state), choice = newest, ("path", newest[0])
    choice = dist_.broadcast_object(choice)
    if choice is None:
        return 0
    if choice[0] == "error":
        raise TrainingError(choice[1])
    path = choice[1]
    if state is None:
        state = load_checkpoint(path)
    load_model_state(run.model, state, path)
    run.optimizer.load_state_dict(state["optimizer"])
    if run.probe is not None and state.get("probe") is not None:
        run.probe.load_state_dict(state["probe"])
        run.probe_opt.load_state_dict(state["probe_optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if run.device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], run.device)
    return int(state["step"])


def _train_step(run: _Run, step: int, views: list[torch.Tensor], labels: torch.Tensor) -> _StepRecord:
    """One optimizer step (and the online probe's); nothing here waits for the device."""
    oc = run.config.optim
    lr = oc.lr * warmup_cosine(step, run.schedule_steps, run.warmup, oc.final_lr_ratio)
    set_learning_rate(run.optimizer, lr)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
        loss, parts, feats = run.net(views)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    hook = getattr(run.model, "before_optimizer_step", None)
    if hook is not None:
        hook(step, run.total_steps)
    grad_names, grad_finite = _gradient_finiteness(run.model)
    run.optimizer.step()
    hook = getattr(run.model, "after_optimizer_step", None)
    if hook is not None:
        hook(step, run.total_steps)
    keys = list(parts)
    values = [loss.detach().float().reshape(1), torch.stack([v.float() for v in parts.values()])]
    if run.probe is not None:
        keys += ["online_probe_loss", "online_probe_acc"]
        values.append(_probe_step(run.probe_net, run.probe_opt, feats, labels))
    state_names, state_finite = _state_finiteness(run)
    return _StepRecord(step=step, epoch=step // len(run.loader), lr=lr, time=time.time(), keys=keys,
                       values=torch.cat(values), grad_names=grad_names, grad_finite=grad_finite,
                       state_names=state_names, state_finite=state_finite)


def train(config: RunConfig, *, resume: bool | str | None = None, progress_bar: bool = True) -> TrainResult:
    """Train ``config`` to the end (or to ``train.max_steps``), writing the run directory.

    ``resume``: True / ``"on"`` (continue the run), ``"auto"`` (continue it if it has a checkpoint,
    else start it), False / ``"off"``; None takes ``train.resume``. Started by torchrun (``WORLD_SIZE``
    > 1), each process trains its share of every global batch and rank 0 writes the files."""
    mode = config.train.resume if resume is None else {True: "on", False: "off"}.get(resume, resume)
    if mode not in RESUME_MODES:
        raise ConfigError(f"resume must be one of {', '.join(RESUME_MODES)}, got {mode!r}")
    world = dist_.launched_world()
    run = _build(config, world)  # every config error is raised here, before anything is written
    # checks that TensorBoard imports when train.log_to asks for it; writes nothing yet
    tracker = Tracker(config.run_dir, config.train.log_to if world.main else ("jsonl",))
    run_dir = config.run_dir
    resuming = _open_run_dir(config, mode)
    tc = config.train
    step = _restore(run) if resuming else 0
    metrics_path = run_dir / "metrics.jsonl"
    if resuming and world.main:
        _truncate_metrics(metrics_path, step)
    tracker.start_step = step
    if step == 0 and "tensorboard" in config.train.log_to and world.main:
        tracker.log_views(0, run_view_tiles(config, run.split)[0])

    end_step = run.total_steps if tc.max_steps is None else min(run.total_steps, tc.max_steps)
    view_steps = tc.view_steps or (4 if run.device.type == "cuda" else 1)
    run.model.train()
    start = time.perf_counter()
    first_step = step
    bar = progress(total=end_step, initial=step, desc=f"train {config.name}", unit="step",
                   disable=not (progress_bar and world.main))
    stream = steps_with_views(_steps(run.loader, step, end_step), run.specs, config.seed, view_steps,
                              run.channels_last, world, run.device, config.data.decode_threads)
    # closed however the loop ends: the bar (an error is then printed on a line of its own, not drawn over)
    # and the view stream (its decode threads end here, before the process group is left)
    with bar, contextlib.closing(stream), \
            open(metrics_path, "a", encoding="utf-8") if world.main else _no_file() as metrics_file, tracker:
        log = _StepLog(metrics_file, bar, tracker, patches_per_step=run.patches_per_step,
                       checkpoints=run_dir / "checkpoints")
        while step < end_step:
            try:
                _, batch, views = next(stream)
                record = _train_step(run, step, views, batch.labels)
            except Exception as e:
                # A step after a non-finite one may fail on its NaN weights (e.g. a Cholesky): the
                # pending records name the first bad step, which is the error to report.
                log.flush()
                if _is_out_of_memory(e):
                    raise TrainingError(
                        f"out of memory at step {step + 1} on {run.device} ({config.data.batch_size} images x "
                        f"{run.patches_per_step // config.data.batch_size} views per step): lower data.batch_size "
                        f"or views.count; the last good checkpoint is kept in {run_dir / 'checkpoints'}"
                    ) from None
                if _is_linear_algebra_failure(e):  # finite but blown-up numbers
                    raise TrainingError(
                        f"linear algebra failed at step {step + 1} ({_linalg_text(e)}): the numbers blew up "
                        f"although the weights are finite; lower optim.lr; the last good checkpoint is kept in "
                        f"{run_dir / 'checkpoints'}") from None
                raise
            log.add(record)
            step += 1
            save = step % tc.checkpoint_every == 0 or step == end_step
            if save or step % tc.log_every == 0:
                log.flush()  # before a checkpoint: a non-finite step stops the run before it is saved
            if save and world.main:
                save_checkpoint(run_dir, _snapshot(run, step), tc.keep_checkpoints)
    seconds = time.perf_counter() - start
    done = step - first_step
    online_acc, final_loss = None, log.last_loss
    already = resuming and done == 0  # a resumed run that had nothing left to do: report what it holds
    if already and world.main:
        rows = read_metrics(run_dir) if metrics_path.exists() else []
        final_loss = float(rows[-1]["loss"]) if rows and rows[-1].get("step") == step else final_loss
    if run.probe is not None and step == run.total_steps:
        stored = dist_.broadcast_object(_stored_probe_accuracy(run_dir, step) if already and world.main else None)
        online_acc = stored if stored is not None else \
            dist_.broadcast_object(_online_probe_report(run, step) if world.main else None)
    if done == 0 and world.main and latest_checkpoint(run_dir) is None:
        save_checkpoint(run_dir, _snapshot(run, step), tc.keep_checkpoints)
    return TrainResult(run_dir=run_dir, steps=step, seconds=seconds,
                       patches_per_s=done * run.patches_per_step / seconds if seconds > 0 and done else 0.0,
                       final_loss=final_loss, model=run.model, online_probe_test_acc=online_acc,
                       main=world.main, already_trained=already)


def _stored_probe_accuracy(run_dir: Path, step: int) -> float | None:
    """The online probe's test accuracy that ``online_probe.json`` holds for ``step`` (None: none)."""
    try:
        stored = json.loads((run_dir / "online_probe.json").read_text(encoding="utf-8"))
        return float(stored["test_acc"]) if stored.get("step") == step else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class _no_file:
    """``with _no_file() as f`` gives None: the metrics file of a rank that writes nothing."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _online_probe_report(run: _Run, step: int) -> float | None:
    """Test accuracy of the online probe at the end of training, written to ``online_probe.json``."""
    config = run.config
    try:
        test = open_split(Path(config.data.root), config.data.test_split, image_size=config.data.image_size)
    except DataError:
        return None  # no test split: nothing to report
    if config.data.test_limit is not None and config.data.test_limit < test.num_images:
        test = test.subset(config.data.test_limit)
    acc = online_probe_accuracy(run.model, run.probe, test, run.specs[0], device=run.device,
                                batch_size=config.eval.batch_size, seed=config.eval.seed, amp=run.amp,
                                channels_last=run.channels_last)
    atomic_write_text(config.run_dir / "online_probe.json",
                      json.dumps({"step": step, "split": config.data.test_split, "test_acc": acc}, indent=2) + "\n")
    return acc
