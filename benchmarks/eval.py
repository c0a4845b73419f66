"""Benchmark: the evaluation's cost against the training step's, measured in the same run.

* **embedding**: forward-only patches/s of each feature kind (``bag``, ``full``, ``map2x2``, ``grid``) through
  :func:`onepoch.eval.embed_split`, on synthetic images, with the network of the recipe; against the
  training step's patches/s (views, forward, backward, optimizer, as ``benchmarks/train_step.py`` runs
  it, channels_last) on the same network, machine and run. ``full`` and ``map2x2`` count one whole image
  as one patch.
* **probes**: seconds of each probe (linear, k-NN, MLP) with the evaluation's default settings on fixed
  synthetic features (Gaussian classes); where scikit-learn is importable, its ``LogisticRegression``
  (lbfgs, on the same standardised features) and a brute-force cosine k-NN on the same rows, with their
  accuracies beside ours. scikit-learn is a reference here, not a dependency.

    python benchmarks/eval.py                                  # demo recipe, CPU or the GPU at hand
    python benchmarks/eval.py --recipe emp_ssl/cifar10_1epoch  # the paper's CIFAR-10 network
    python benchmarks/eval.py --smoke                          # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from train_step import Stepper, pipelined, recipe_setup, synthetic_batches, sync_for

from onepoch.eval import embed_split
from onepoch.probes import knn_probe, linear_probe, mlp_probe
from onepoch.run import eval_amp, eval_max_patches, view_specs_for
from onepoch.runconfig import EvalConfig
from onepoch.views import load_view_spec

KINDS = ("bag", "full", "map2x2", "grid")


def embedding_rates(model, config, images: np.ndarray, device: torch.device, *, bag_patches: int,
                    batch_size: int, max_patches: int, amp: bool) -> dict[str, dict[str, float]]:
    """Forward-only patches/s and images/s of every feature kind on ``images``."""
    channels = images.shape[-1]
    spec = view_specs_for(config, [0.5] * channels, [0.25] * channels)[0]
    sync = sync_for(device)
    rates = {}
    for kind in KINDS:
        spec_k = load_view_spec(spec, {"count": bag_patches}) if kind == "bag" else spec
        kw = dict(spec=spec_k, batch_size=batch_size, device=device, seed=0, amp=amp, channels_last=True,
                  progress_desc=f"embed {kind}", max_patches=max_patches)
        embed_split(model, images[:batch_size], kind, **kw)  # warm-up
        sync()
        t0 = time.perf_counter()
        features = embed_split(model, images, kind, **kw)
        sync()
        seconds = time.perf_counter() - t0
        if kind == "bag":
            per_image = bag_patches
        elif kind == "grid":
            per_image = features.shape[1] // model.backbone.feature_dim
        else:
            per_image = 1
        rates[kind] = {"patches_per_image": per_image, "images_per_s": images.shape[0] / seconds,
                       "patches_per_s": images.shape[0] * per_image / seconds, "dim": int(features.shape[1])}
    model.train()
    return rates


def gaussian_classes(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
    """Overlapping Gaussian classes: the probes' accuracies are neither chance nor 100 %."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * (3.0 / math.sqrt(dim))
    ytr = torch.randint(0, classes, (n_train,), generator=g)
    yte = torch.randint(0, classes, (n_test,), generator=g)
    return (centres[ytr] + 2.0 * torch.randn(n_train, dim, generator=g), ytr,
            centres[yte] + 2.0 * torch.randn(n_test, dim, generator=g), yte)


def probe_times(n_train: int, n_test: int, dim: int, classes: int, ec: EvalConfig, device: torch.device,
                smoke: bool, which: list[str]) -> dict[str, dict]:
    xtr, ytr, xte, yte = (t.to(device) for t in gaussian_classes(n_train, n_test, dim, classes))
    linear_kw = ({"weight_decays": (0.0,), "epochs": (1,)} if smoke
                 else {"weight_decays": ec.linear_weight_decays, "epochs": ec.linear_epochs})
    mlp_kw = ({"hidden": (16,), "dropouts": (0.0,), "epochs": (1,)} if smoke
              else {"hidden": ec.mlp_hidden, "dropouts": ec.mlp_dropouts, "weight_decays": ec.mlp_weight_decays,
                    "epochs": ec.mlp_epochs})
    runs = {
        "linear": lambda: linear_probe(xtr, ytr, xte, yte, val_fraction=ec.val_fraction, **linear_kw),
        "knn": lambda: knn_probe(xtr, ytr, xte, yte, k=ec.knn_k, temperature=ec.knn_temperature,
                                 val_fraction=ec.val_fraction),
        # the same k-NN without the bfloat16 shortlist (float32 products throughout): the same predictions
        "knn_float32": lambda: knn_probe(xtr, ytr, xte, yte, k=ec.knn_k, temperature=ec.knn_temperature,
                                         val_fraction=ec.val_fraction, shortlist="off"),
        "mlp": lambda: mlp_probe(xtr, ytr, xte, yte, val_fraction=ec.val_fraction, **mlp_kw),
    }
    out = {}
    for name, fn in runs.items():
        if name.split("_")[0] not in which:
            continue
        t0 = time.perf_counter()
        r = fn()
        out[name] = {"seconds": time.perf_counter() - t0, "test_acc": r.test_acc, "chosen": r.chosen}
    out.update(sklearn_references(xtr.cpu(), ytr.cpu(), xte.cpu(), yte.cpu(), ec))
    return out


def sklearn_references(xtr, ytr, xte, yte, ec: EvalConfig) -> dict[str, dict]:
    """scikit-learn's LogisticRegression (lbfgs, one fit at C = 1) and brute-force cosine k-NN (k = 20,
    uniform weights), when it is installed; nothing otherwise."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.neighbors import KNeighborsClassifier
    except ImportError:
        return {}
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    ztr, zte = ((xtr - mean) / std).numpy(), ((xte - mean) / std).numpy()
    out = {}
    t0 = time.perf_counter()
    lr = LogisticRegression(max_iter=1000).fit(ztr, ytr.numpy())
    out["sklearn_logistic_lbfgs"] = {"seconds": time.perf_counter() - t0,
                                     "test_acc": float((lr.predict(zte) == yte.numpy()).mean())}
    t0 = time.perf_counter()
    knn = KNeighborsClassifier(n_neighbors=20, algorithm="brute", metric="cosine").fit(xtr.numpy(), ytr.numpy())
    pred = knn.predict(xte.numpy())
    out["sklearn_knn_brute"] = {"seconds": time.perf_counter() - t0, "test_acc": float((pred == yte.numpy()).mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="emp_ssl/fashion_mnist_demo")
    parser.add_argument("--images", type=int, default=2000, help="synthetic images embedded per kind (default 2000)")
    parser.add_argument("--rows", type=int, default=20000, help="training rows of the probes' features (default 20000)")
    parser.add_argument("--dim", type=int, default=512, help="width of the probes' features (default 512)")
    parser.add_argument("--probes", default="linear,knn,mlp", help="probes to time (default linear,knn,mlp)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="a tiny network, few images and rows: checks that it runs")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the recipe")
    args = parser.parse_args(argv)
    overrides, config, device, channels, size = recipe_setup(args)
    batch = 8 if args.smoke else config.data.batch_size
    n_images, n_rows, dim = (16, 300, 16) if args.smoke else (args.images, args.rows, args.dim)
    ec = config.eval

    stepper = Stepper(config, synthetic_batches(4, batch, size, channels), device, channels_last=True)
    pipelined(stepper, 2, 2, 1)  # warm-up
    steps = 2 if args.smoke else 10
    rounds = 1 if args.smoke else 3
    train_before = max(pipelined(stepper, steps, steps, 1)[0] for _ in range(rounds))
    images = synthetic_batches(1, n_images, size, channels, seed=1)[0].numpy()
    common = dict(bag_patches=ec.bag_patches, batch_size=min(ec.batch_size, n_images))
    # the evaluation's own settings (eval.amp, eval.max_patches), then float32 in pieces of 8192 patches: the
    # settings every device used before eval.amp and the per-device piece size existed
    amp, max_patches = eval_amp(config, device), eval_max_patches(config, device)
    rates = embedding_rates(stepper.model, config, images, device, max_patches=max_patches, amp=amp, **common)
    earlier = {"amp": device.type == "cuda", "max_patches": 8192}
    rates_earlier = None
    if (amp, max_patches) != (earlier["amp"], earlier["max_patches"]):
        rates_earlier = embedding_rates(stepper.model, config, images, device, **earlier, **common)
    # training measured again after the embeddings: on a shared machine the load moves, and the faster of the
    # two is the reference (the ratio is then the lower of the two it could be)
    train_after = max(pipelined(stepper, steps, steps, 1)[0] for _ in range(rounds))
    train_rate = max(train_before, train_after)
    probes = probe_times(n_rows, max(100, n_rows // 5), dim, 10, ec, device, args.smoke, args.probes.split(","))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.recipe} on {name}, torch {torch.__version__}")
    print(f"  training step (views, forward, backward, optimizer): {train_rate:>10,.0f} patches/s (reference; "
          f"{train_before:,.0f} before the embeddings, {train_after:,.0f} after)")
    for label, table in ((f"eval settings ({'bf16' if amp else 'float32'}, pieces of {max_patches})", rates),
                         (f"earlier settings ({'bf16' if earlier['amp'] else 'float32'}, pieces of 8192)",
                          rates_earlier)):
        if table is None:
            continue
        print(f"  {label}:")
        for kind, r in table.items():
            print(f"    embed {kind:<7} forward only: {r['patches_per_s']:>10,.0f} patches/s "
                  f"({r['images_per_s']:,.0f} images/s, {r['patches_per_image']} per image)  "
                  f"{r['patches_per_s'] / train_rate:.2f}x training")
    print(f"  probes on {n_rows} x {dim} features, 10 classes:")
    for probe, r in probes.items():
        print(f"    {probe:<24} {r['seconds']:8.2f} s   test {100 * r['test_acc']:.2f} %")
    if "sklearn_logistic_lbfgs" not in probes:
        print("    (scikit-learn is not installed: no reference probes)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"recipe": args.recipe, "overrides": overrides, "device": name, "torch": torch.__version__,
                       "train_patches_per_s": train_rate, "train_patches_per_s_before_after": [train_before, train_after],
                       "embedding": rates, "embedding_settings": {"amp": amp, "max_patches": max_patches},
                       "embedding_earlier_settings": rates_earlier,
                       "embed_over_train": {k: r["patches_per_s"] / train_rate for k, r in rates.items()},
                       "probes": probes, "probe_rows": n_rows, "probe_dim": dim}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
