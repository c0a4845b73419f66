"""Benchmark: patches/s of one EMP-SSL training step (views + forward + backward + optimizer step).

The reference is measured in the same run on the same batches: the same step with the model and
its inputs in the default (NCHW-contiguous) memory format, against channels_last, which the trainer
uses by default (``train.channels_last=auto``). On CUDA both run under bf16 autocast, as the trainer
does. Each rate is the best of ``--rounds`` rounds of ``--steps`` steps.

    python benchmarks/train_step.py                                     # the demo recipe, synthetic data
    python benchmarks/train_step.py --recipe emp_ssl/cifar10_1epoch     # the paper's CIFAR-10 setting
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from onepoch.optim import build_optimizer
from onepoch.runconfig import load_config
from onepoch.train import build_model, pick_device, view_spec_for


def synthetic_batch(batch: int, size: int, channels: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8))


def measure(config, images: torch.Tensor, device: torch.device, channels_last: bool, steps: int, rounds: int
            ) -> float:
    torch.manual_seed(0)
    model = build_model(config, images.shape[-1]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    oc = config.optim
    opt = build_optimizer(model.named_parameters(), oc.name, lr=oc.lr, weight_decay=oc.weight_decay)
    spec = view_spec_for(config, [0.5] * images.shape[-1], [0.25] * images.shape[-1])
    gen = torch.Generator().manual_seed(0)
    amp = device.type == "cuda"
    images = images.to(device)

    def step():
        from onepoch.views import make_views

        views = make_views(images, spec, gen, channels_last=channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = model(views, spec.count)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, cuDNN/oneDNN choices)
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / steps)
    return images.shape[0] * spec.count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="emp_ssl/fashion_mnist_demo")
    parser.add_argument("--size", type=int, help="image size (default 28 for 1 channel, else 32)")
    parser.add_argument("--batch", type=int, help="images per step (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    config = load_config(args.recipe)
    device = pick_device(args.device)
    channels = 1 if "fashion" in args.recipe else 3
    size = args.size or (28 if channels == 1 else 32)
    images = synthetic_batch(args.batch or config.data.batch_size, size, channels)
    ref = measure(config, images, device, False, args.steps, args.rounds)
    fast = measure(config, images, device, True, args.steps, args.rounds)
    result = {"recipe": args.recipe, "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "patches_per_s_contiguous": ref,
              "patches_per_s_channels_last": fast, "ratio": fast / ref}
    print(f"{args.recipe} on {device} ({torch.get_num_threads()} threads), {images.shape[0]} images/step:")
    print(f"  contiguous (reference)  {ref:>10,.0f} patches/s")
    print(f"  channels_last (default) {fast:>10,.0f} patches/s   {fast / ref:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
