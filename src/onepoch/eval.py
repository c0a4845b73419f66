"""Evaluation of a trained representation: embeddings computed once into memory, then probes.

Feature kinds (``eval.features``):

- ``bag``: EMP-SSL's bag of features: the mean over k random patches (the training view recipe with
  ``count = eval.bag_patches``, seeded) of the method's representation layer (``pre_feature`` for
  EMP-SSL, else the backbone output);
- ``full``: the backbone output on the whole (normalised) image;
- ``map2x2``: the backbone's last feature map on the whole image, average-pooled to a 2x2 grid and
  flattened (4x the backbone width; keeps the coarse layout, at the cost of one full-image pass);
- ``grid``: the backbone outputs of a fixed grid of patches, each the training crop size at a stride
  of half of it, resized like the training patches and concatenated in grid order (keeps the
  layout that averaging throws away; deterministic).

Probes (``eval.probes``), all with their hyper-parameters chosen on a validation split carved from the
training set and the test accuracy reported once at that choice: ``linear`` (softmax regression),
``mlp`` (one hidden layer with BatchNorm and dropout: the non-linear probe) and ``knn`` (weighted
k-NN, cosine, with a sweep over k and the temperature). ``eval.layer`` picks what ``bag`` and ``full``
read: the backbone output, EMP-SSL's ``pre_feature`` or the projector output.

Protocols (``eval.protocol``): ``onepoch`` (the probes above); ``paper``: EMP-SSL's official evaluation
(:mod:`onepoch.paper_probes`: SGD linear probe on the raw bag for 100 epochs, reporting the last epoch and
the best epoch chosen on test as the paper does, and k-NN with k = 20, T = 0.07) on the ``bag`` feature
only, reported and never used to choose anything; ``both``: the two on one shared bag embedding. Every
probe entry in ``eval.json`` names its ``protocol``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onepoch.atomic import atomic_write_text
from onepoch.errors import ConfigError
from onepoch.feature_cache import FeatureCache, checkpoint_identity, split_identity
from onepoch.paper_probes import PAPER_KNN, PAPER_LINEAR, paper_knn_probe, paper_linear_probe
from onepoch.probes import knn_probe, linear_probe, mlp_probe
from onepoch.progress import progress
from onepoch.run import eval_amp, eval_max_patches, load_trained, pick_device, view_spec_for
from onepoch.runconfig import RunConfig
from onepoch.tracking import Tracker
from onepoch.views import apply_view_params, load_view_spec, sample_view_params

__all__ = ["embed_split", "evaluate_model", "evaluate_run", "grid_patches", "knn_probe", "linear_probe", "mlp_probe"]


# part of every cached feature's description (onepoch.feature_cache): raise it whenever what embed_split
# computes changes, so that features of the earlier code are never served
EMBEDDING_VERSION = 2


def representation_layer(model: nn.Module, layer: str = "auto") -> str:
    """The layer ``bag`` and ``full`` features read: ``layer``, or for ``auto`` the layer a bag of
    features averages (``pre_feature`` when the method has one, else ``backbone``)."""
    if layer == "auto":
        return "pre_feature" if hasattr(model, "pre_feature") else "backbone"
    return layer


def _normalise(images_u8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W), (x/255 - mean) / std."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def grid_starts(n: int, crop: int) -> list[int]:
    """Where a grid's crops start along a side of ``n`` pixels: every ``max(1, crop // 2)`` pixels, the last
    one aligned to the border (a crop larger than the side is cut to it)."""
    crop = min(crop, n)
    s = list(range(0, n - crop + 1, max(1, crop // 2)))
    if s[-1] != n - crop:
        s.append(n - crop)
    return s


def grid_patches(images_u8: torch.Tensor, crop: int, out_size: int, mean: list[float], std: list[float]
                 ) -> tuple[torch.Tensor, int]:
    """Patch-major (P·B, C, out, out) crops of size ``crop`` at stride ``max(1, crop // 2)`` covering
    each image (the last row/column aligned to the border), resized (antialiased bilinear) to
    ``out_size``; returns them and P."""
    x = _normalise(images_u8, mean, std)
    h, w = x.shape[-2:]
    crop = min(crop, h, w)
    tiles = [x[:, :, i:i + crop, j:j + crop] for i in grid_starts(h, crop) for j in grid_starts(w, crop)]
    p = torch.cat(tiles)
    if crop != out_size:
        p = F.interpolate(p, size=(out_size, out_size), mode="bilinear", antialias=crop > out_size,
                          align_corners=False)
    return p, len(tiles)


def layer_output(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of ``layer`` for the input ``x``, computing only the layers up to it (the projector
    only when it is asked for)."""
    h = model.backbone(x)
    if layer == "backbone":
        return h
    if layer == "pre_feature":
        return model.pre_feature(h)
    return model.features(x)[layer]


def _chunked(fn, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``fn`` applied to ``x`` in pieces of at most ``rows`` rows, concatenated (float32)."""
    return torch.cat([fn(part).float() for part in x.split(max(1, rows))])


@torch.no_grad()  # not inference_mode: the probes train on these features with autograd
def embed_split(model: nn.Module, images, kind: str, *, spec, batch_size: int, device: torch.device,
                seed: int, amp: bool = False, channels_last: bool = False, progress_desc: str = "",
                layer: str = "auto", max_patches: int = 8192) -> torch.Tensor:
    """Features of every image of ``images`` (uint8 NHWC array or tensor) for feature ``kind``;
    float32, on ``device``. ``layer`` (see :func:`representation_layer`) is what ``bag`` averages and
    ``full`` reads (``auto``: the backbone for ``full``); ``map2x2`` and ``grid`` read the backbone.
    ``channels_last``: feed the model NHWC-strided tensors (faster on CPU and CUDA when the model is
    channels_last too).

    Memory is bounded whatever the bag size: at most ``max_patches`` patches (or whole images, for
    ``full`` and ``map2x2``) go through the network at once, and a grid's patches are cut for that many
    at a time; a bag's views are drawn for the whole batch of ``batch_size`` images first, so the
    features do not depend on the chunking. Views are rendered in float32 outside autocast; ``amp``
    puts only the network under bf16 autocast."""
    model.eval()
    bag_layer = representation_layer(model, layer)
    full_layer = "backbone" if layer == "auto" else layer
    available = getattr(model, "feature_layers", ("backbone",))
    for wanted in {bag_layer, full_layer} if kind in ("bag", "full") else ():
        if wanted not in available:
            raise ConfigError(f"eval.layer {wanted!r} does not exist in this model; it has: {', '.join(available)}")
    if kind not in ("bag", "full", "map2x2", "grid"):
        raise ValueError(f"unknown feature kind {kind!r}")
    generator = torch.Generator().manual_seed(seed)
    crop = max(1, round(math.sqrt(spec.crop_scale[1]) * min(images.shape[1], images.shape[2])))
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def network(layer_name: str):
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return layer_output(model, x.contiguous(memory_format=fmt), layer_name)
        return run

    def bag(batch: torch.Tensor) -> torch.Tensor:
        b = batch.shape[0]
        params = sample_view_params(spec, b, batch.shape[1], batch.shape[2], generator)
        views_per_pass = max(1, max_patches // b)
        total = 0
        for v0 in range(0, spec.count, views_per_pass):
            rows = slice(v0 * b, min(spec.count, v0 + views_per_pass) * b)
            views = apply_view_params(batch, params.rows(rows), spec, channels_last=channels_last)
            total = total + network(bag_layer)(views).float().unflatten(0, (-1, b)).sum(0)
        return total / spec.count

    def map2x2(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            fmap = model.backbone.forward_map(x.contiguous(memory_format=fmt))
        return F.adaptive_avg_pool2d(fmap.float(), 2).flatten(1)

    grid_crop = min(crop, images.shape[1], images.shape[2])
    grid_count = len(grid_starts(images.shape[1], grid_crop)) * len(grid_starts(images.shape[2], grid_crop))

    def grid(x: torch.Tensor) -> torch.Tensor:
        tiles, count = grid_patches(x, crop, spec.size, spec.mean, spec.std)
        f = network("backbone")(tiles).float().view(count, x.shape[0], -1)
        return f.permute(1, 0, 2).reshape(x.shape[0], -1)

    out = []
    n = images.shape[0]
    bar = progress(total=n, desc=progress_desc or f"embed {kind}", unit="img")
    for start in range(0, n, batch_size):
        batch = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)
        if kind == "bag":
            f = bag(batch)
        elif kind == "full":
            f = _chunked(lambda part: network(full_layer)(_normalise(part, spec.mean, spec.std)), batch, max_patches)
        elif kind == "map2x2":
            f = _chunked(lambda part: map2x2(_normalise(part, spec.mean, spec.std)), batch, max_patches)
        else:  # grid: the patches of as many images as max_patches allows, cut and embedded together
            f = _chunked(grid, batch, max(1, max_patches // grid_count))
        out.append(f.float())
        bar.update(batch.shape[0])
    bar.close()
    return torch.cat(out)


def evaluate_model(model: nn.Module, config: RunConfig, *, device: torch.device, train_split, test_split,
                   spec, features: tuple[str, ...] | None = None, include_raw_pixels: bool = False,
                   log=print, cache: FeatureCache | None = None) -> dict[str, Any]:
    """Embed the train and test splits for each feature kind and run the configured probes.

    Returns ``{"<feature>": {"dim": d, "embed_seconds": s, "linear": {...}, "knn": {...}}}``; with
    ``include_raw_pixels`` also ``"raw_pixels"`` (the linear probe on the flattened pixels). With a
    ``cache`` (bound to this model's checkpoint), features computed before for the same checkpoint, dataset
    and settings are read from it instead of embedded again, and new ones are stored in it.
    """
    ec = config.eval
    amp = eval_amp(config, device)
    max_patches = eval_max_patches(config, device)
    channels_last = config.train.channels_last != "off"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ytr = torch.from_numpy(np.array(train_split.labels)).long().to(device)
    yte = torch.from_numpy(np.array(test_split.labels)).long().to(device)
    num_classes = len(train_split.class_names)
    results: dict[str, Any] = {}

    def run_probes(name: str, ftr: torch.Tensor, fte: torch.Tensor, probes) -> dict[str, Any]:
        entry: dict[str, Any] = {"dim": int(ftr.shape[1])}
        for probe in probes:
            t0 = time.perf_counter()
            if probe == "linear":
                r = linear_probe(ftr, ytr, fte, yte, num_classes=num_classes, val_fraction=ec.val_fraction,
                                 weight_decays=ec.linear_weight_decays, epochs=ec.linear_epochs, seed=ec.seed)
            elif probe == "mlp":
                r = mlp_probe(ftr, ytr, fte, yte, num_classes=num_classes, val_fraction=ec.val_fraction,
                              hidden=ec.mlp_hidden, dropouts=ec.mlp_dropouts, weight_decays=ec.mlp_weight_decays,
                              epochs=ec.mlp_epochs, seed=ec.seed)
            else:
                r = knn_probe(ftr, ytr, fte, yte, k=ec.knn_k, temperature=ec.knn_temperature,
                              num_classes=num_classes, val_fraction=ec.val_fraction, seed=ec.seed)
            entry[probe] = {"test_acc": r.test_acc, "val_acc": r.val_acc, "chosen": r.chosen,
                            "seconds": time.perf_counter() - t0, "protocol": "onepoch"}
            log(f"  {name:<10} {probe:<6} test {100 * r.test_acc:6.2f} %  (val {100 * r.val_acc:6.2f} %, "
                f"{', '.join(f'{k}={v}' for k, v in r.chosen.items())})")
        return entry

    def run_paper_probes(entry: dict[str, Any], ftr: torch.Tensor, fte: torch.Tensor) -> None:
        """EMP-SSL's official probes on this (bag) feature, added to ``entry``; chosen on nothing but the
        test set's best epoch, which is labelled as such."""
        t0 = time.perf_counter()
        r = paper_linear_probe(ftr, ytr, fte, yte, num_classes=num_classes, seed=ec.seed)
        entry["paper_linear"] = {"test_acc": r.last_test_acc, "best_test_acc": r.best_test_acc,
                                 "best_epoch": r.best_epoch, "chosen_on": "test (best epoch, the paper's way)",
                                 "settings": dict(PAPER_LINEAR), "seconds": time.perf_counter() - t0,
                                 "protocol": "paper"}
        log(f"  {'bag':<10} paper linear: last epoch {100 * r.last_test_acc:6.2f} %, best epoch "
            f"{100 * r.best_test_acc:6.2f} % (epoch {r.best_epoch}, chosen on test as in the paper)")
        t0 = time.perf_counter()
        acc = paper_knn_probe(ftr, ytr, fte, yte, num_classes=num_classes)
        entry["paper_knn"] = {"test_acc": acc, "settings": dict(PAPER_KNN), "seconds": time.perf_counter() - t0,
                              "protocol": "paper"}
        log(f"  {'bag':<10} paper k-NN (k=20, T=0.07): {100 * acc:6.2f} %")

    if include_raw_pixels:
        ftr = torch.from_numpy(np.array(train_split.images)).reshape(train_split.num_images, -1).float().div(255)
        fte = torch.from_numpy(np.array(test_split.images)).reshape(test_split.num_images, -1).float().div(255)
        ftr, fte = ftr.to(device), fte.to(device)
        results["raw_pixels"] = run_probes("raw_pixels", ftr, fte, ("linear",))
        del ftr, fte
    kinds = tuple(features or ec.features)
    if ec.protocol == "paper":
        kinds = ("bag",)
    elif ec.protocol == "both" and "bag" not in kinds:
        kinds += ("bag",)
    for kind in kinds:
        t0 = time.perf_counter()
        spec_k = spec if kind != "bag" else _with_count(spec, ec.bag_patches)

        def embed(split, seed: int, what: str, kind=kind, spec_k=spec_k) -> torch.Tensor:
            def compute() -> torch.Tensor:
                return embed_split(model, split.images, kind, spec=spec_k, batch_size=ec.batch_size, device=device,
                                   seed=seed, amp=amp, channels_last=channels_last,
                                   progress_desc=f"embed {what} ({kind})", layer=ec.layer, max_patches=max_patches)
            if cache is None:
                return compute()
            description = {"embedding": EMBEDDING_VERSION, "torch": torch.__version__, "data": split_identity(split),
                           "kind": kind, "layer": ec.layer, "views": spec_k.to_dict(),
                           "seed": seed, "batch_size": ec.batch_size, "amp": amp, "channels_last": channels_last,
                           "device": device.type}
            return cache.features(description, compute, device)

        ftr = embed(train_split, ec.seed, "train")
        fte = embed(test_split, ec.seed + 1, "test")
        embed_s = time.perf_counter() - t0
        results[kind] = run_probes(kind, ftr, fte, ec.probes if ec.protocol != "paper" else ())
        if kind == "bag" and ec.protocol != "onepoch":
            run_paper_probes(results[kind], ftr, fte)
        results[kind]["embed_seconds"] = embed_s
        results[kind]["test_images"] = int(fte.shape[0])
        if kind == "bag":
            results[kind]["patches"] = ec.bag_patches
    return results


def _with_count(spec, count: int):
    return load_view_spec(spec, {"count": count})


def evaluate_run(run_dir: str | os.PathLike, *, overrides: dict[str, Any] | None = None, log=print
                 ) -> dict[str, Any]:
    """Evaluate the newest checkpoint of a run directory (its config with the dotted ``overrides``
    applied); write ``eval.json`` there (this evaluation's results merged into the earlier ones of the same
    checkpoint, see :func:`merge_results`) and return it, with ``"evaluated"``: this evaluation's results alone."""
    run = load_trained(run_dir, overrides)
    if run.model is None:
        raise ConfigError(f"{run.run_dir} has no checkpoint to evaluate (train it first)")
    run_dir, config, ckpt, step = run.run_dir, run.config, run.checkpoint, run.step
    train_split, test_split = run.train_split, run.test_split
    tracker = Tracker(run_dir, config.train.log_to)  # a missing TensorBoard fails here, before the work
    device = pick_device(config.train.device)
    model = run.model.to(device)
    spec = view_spec_for(config, train_split.mean, train_split.std)
    log(f"evaluating {run_dir} at step {step} on {device}")
    cache = FeatureCache(run_dir / "features", checkpoint_identity(ckpt, step))
    results = evaluate_model(model, config, device=device, train_split=train_split, test_split=test_split, spec=spec,
                             log=log, cache=cache)
    report = {"run": str(run_dir), "checkpoint": ckpt.name, "step": step,
              "eval_config": asdict(config.eval), "test_images": test_split.num_images,
              "results": merge_results(_earlier_results(run_dir / "eval.json", ckpt.name, step), results)}
    atomic_write_text(run_dir / "eval.json", json.dumps(report, indent=2) + "\n")
    with tracker:
        tracker.log_hparams(config, results)
    return {**report, "evaluated": results}


def _earlier_results(path: Path, checkpoint: str, step: int) -> dict[str, Any]:
    """The results of an earlier ``eval.json`` of the same checkpoint (nothing when there is none, it is
    of another checkpoint, or it cannot be read)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(earlier, dict) or earlier.get("checkpoint") != checkpoint or earlier.get("step") != step:
        return {}
    results = earlier.get("results")
    return results if isinstance(results, dict) else {}


_FEATURE_SETTINGS = ("dim", "patches", "test_images")


def merge_results(earlier: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``earlier``, feature by feature and probe by probe: an earlier probe entry is kept
    unless the new evaluation ran the same probe on that feature; an earlier feature entry whose settings
    (dimension, bag patches, test images) differ from the new one's is replaced whole."""
    merged = {kind: dict(entry) for kind, entry in earlier.items() if isinstance(entry, dict)}
    for kind, entry in new.items():
        old = merged.get(kind)
        if old is None or any(old.get(key) != entry.get(key) for key in _FEATURE_SETTINGS):
            merged[kind] = dict(entry)
        else:
            old.update(entry)
    return merged


PROBE_COLUMNS = ("linear", "mlp", "knn", "paper_linear", "paper_linear_best", "paper_knn")


def _cell(entry: dict[str, Any], column: str, width: int) -> str:
    if column == "paper_linear_best":
        value = entry.get("paper_linear", {}).get("best_test_acc")
    else:
        value = entry.get(column, {}).get("test_acc")
    return f"{100 * value:>{width}.2f}" if value is not None else f"{'-':>{width}}"


def format_table(rows: list[tuple[str, dict[str, Any]]], probes=None) -> str:
    """A plain-text table: one row per (label, results-of-one-feature-kind); columns: ``probes``
    (default: those present, in the order linear, mlp, knn)."""
    if probes is None:
        probes = [p for p in PROBE_COLUMNS if any(p.removesuffix("_best") in entry for _, entry in rows)]
    titles = {"paper_linear": "paper-lin", "paper_linear_best": "best-ep*", "paper_knn": "paper-knn"}
    heads = [titles.get(p, p) + " %" for p in probes]
    widths = [max(10, len(h) + 2) for h in heads]
    lines = [f"{'':<34}" + "".join(f"{h:>{w}}" for h, w in zip(heads, widths))]
    for label, entry in rows:
        lines.append(f"{label:<34}" + "".join(_cell(entry, p, w) for p, w in zip(probes, widths)))
    if "paper_linear_best" in probes:
        lines.append("paper-*: EMP-SSL's official evaluation (last epoch); best-ep*: its best epoch, chosen on "
                     "the test set as the paper reports it")
    return "\n".join(lines)
