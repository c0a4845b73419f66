"""Benchmark: one training step of a recipe, its time broken down, and the layout ratio.

Two measurements on the same synthetic batches, in the same run:

* **breakdown** (the device synchronised after each phase): seconds per step in rendering the views,
  the forward pass (the method's heads and loss included), the loss function alone (timed inside the
  forward), the backward pass and the optimizer step (with the method's hooks);
* **pipelined** (as the trainer runs: no synchronisation inside the step, one every ``--log-every``
  steps): patches/s, and the share of that time the host spent waiting for the device (high: the
  device is the bottleneck, as it should be; near 0 on a GPU: the host cannot keep it busy).

The pipelined step runs with the model in channels_last (the trainer's default) and, as the
reference, in the default NCHW layout; their ratio is the layout's gain. bf16 autocast follows the
trainer (``train.amp=auto``: on CUDA only), views ``--view-steps`` steps per call (default: the
trainer's, 4 on CUDA and 1 on CPU).

    python benchmarks/train_step.py                                     # demo recipe, synthetic data
    python benchmarks/train_step.py --recipe emp_ssl/cifar10_1epoch     # the paper's CIFAR-10 setting
    python benchmarks/train_step.py --smoke                             # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import time

import numpy as np
import torch

from onepoch.optim import build_optimizer
from onepoch.run import build_model, pick_device, use_amp, view_specs_for
from onepoch.runconfig import load_config
from onepoch.views.stream import step_view_groups

SMOKE = ["model.arch=resnet10", "model.width=0.125", "views.count=2", "views.size=8"]
SMOKE_HEADS = {"pre_feature": "32", "projector": "32-16", "predictor": "32-16", "prototypes": 8}


def smoke_overrides(recipe: str) -> list[str]:
    """A tiny network and tiny heads for ``--smoke``, whatever the recipe's method."""
    from dataclasses import fields

    from onepoch import methods

    method = load_config(recipe).method["name"]
    keys = {f.name for f in fields(methods.get(method).config_class)}
    return SMOKE + [f"method.{k}={v}" for k, v in SMOKE_HEADS.items() if k in keys]


def recipe_setup(args) -> tuple[list[str], object, torch.device, int, int]:
    """From a benchmark's ``--recipe``, ``--smoke``, ``--device``, overrides (and ``--size`` if it has one):
    the overrides applied, the config, the device, the image channels and size (one thread under --smoke)."""
    overrides = [*(smoke_overrides(args.recipe) if args.smoke else []), *args.overrides]
    if args.smoke:
        torch.set_num_threads(1)
    config = load_config(args.recipe, overrides)
    channels = 1 if "fashion" in config.data.root else 3
    size = getattr(args, "size", None) or (28 if channels == 1 else 32)
    return overrides, config, pick_device(args.device), channels, size


def synthetic_batches(count: int, batch: int, size: int, channels: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8))
            for _ in range(count)]


class Stepper:
    """The trainer's step (views, autocast forward, backward, hooks, LARS) on fixed batches."""

    def __init__(self, config, batches: list[torch.Tensor], device: torch.device, channels_last: bool):
        torch.manual_seed(0)
        self.config, self.device, self.channels_last = config, device, channels_last
        channels = batches[0].shape[-1]
        self.model = build_model(config, channels).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        oc = config.optim
        self.opt = build_optimizer(self.model.named_parameters(), oc.name, lr=oc.lr, weight_decay=oc.weight_decay,
                                   momentum=oc.momentum, trust_coefficient=oc.trust_coefficient)
        self.specs = view_specs_for(config, [0.5] * channels, [0.25] * channels)
        self.amp = use_amp(config.train.amp, device)
        self.batches = [b.to(device) for b in batches]
        self.patches = batches[0].shape[0] * sum(s.count for s in self.specs)
        self.step_index = 0

    def views(self, k: int) -> list:
        first = self.step_index
        chosen = [self.batches[(first + i) % len(self.batches)] for i in range(k)]
        return step_view_groups(chosen, self.specs, 0, first, channels_last=self.channels_last)

    def forward(self, views):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss, _, _ = self.model(views)
        return loss

    def backward(self, loss) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()

    def optimizer(self) -> None:
        hook = getattr(self.model, "before_optimizer_step", None)
        if hook is not None:
            hook(self.step_index, 1000)
        self.opt.step()
        hook = getattr(self.model, "after_optimizer_step", None)
        if hook is not None:
            hook(self.step_index, 1000)
        self.step_index += 1


def sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@contextlib.contextmanager
def timed_loss(config, sync, totals: dict):
    """Times the method's loss function (``onepoch.losses.<name>`` as its module imported it)."""
    module = importlib.import_module(f"onepoch.methods.{config.method['name']}")
    names = [n for n in dir(module) if n.endswith("_loss") and callable(getattr(module, n))]
    real = {n: getattr(module, n) for n in names}

    def wrap(fn):
        def timed(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            totals["loss"] += time.perf_counter() - t0
            return out
        return timed

    for n in names:
        setattr(module, n, wrap(real[n]))
    try:
        yield
    finally:
        for n in names:
            setattr(module, n, real[n])


def breakdown(stepper: Stepper, steps: int) -> dict[str, float]:
    """Mean seconds per step of each phase, the device synchronised around each."""
    sync = sync_for(stepper.device)
    totals = dict(views=0.0, forward=0.0, loss=0.0, backward=0.0, optimizer=0.0)
    with timed_loss(stepper.config, sync, totals):
        for _ in range(steps):
            phases = []
            sync()
            t0 = time.perf_counter()
            views = stepper.views(1)[0]
            sync()
            phases.append(("views", time.perf_counter() - t0))
            t0 = time.perf_counter()
            loss = stepper.forward(views)
            sync()
            phases.append(("forward", time.perf_counter() - t0))
            t0 = time.perf_counter()
            stepper.backward(loss)
            sync()
            phases.append(("backward", time.perf_counter() - t0))
            t0 = time.perf_counter()
            stepper.optimizer()
            sync()
            phases.append(("optimizer", time.perf_counter() - t0))
            for name, seconds in phases:
                totals[name] += seconds
    return {k: v / steps for k, v in totals.items()}


def pipelined(stepper: Stepper, steps: int, log_every: int, view_steps: int) -> tuple[float, float]:
    """(patches/s, share of the time spent waiting for the device) over ``steps`` steps run like the
    trainer: views for ``view_steps`` steps per call, one synchronisation (a loss value read back)
    every ``log_every`` steps."""
    sync = sync_for(stepper.device)
    sync()
    waited = 0.0
    losses = []
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        for views in stepper.views(min(view_steps, steps - done)):
            loss = stepper.forward(views)
            stepper.backward(loss)
            stepper.optimizer()
            losses.append(loss.detach())
            done += 1
            if done % log_every == 0 or done == steps:
                w0 = time.perf_counter()
                torch.stack(losses).tolist()  # the trainer's one host sync per window
                waited += time.perf_counter() - w0
                losses = []
    sync()
    seconds = time.perf_counter() - t0
    return steps * stepper.patches / seconds, waited / seconds


def run(config, batches, device, *, steps: int, rounds: int, log_every: int, view_steps: int) -> dict:
    result: dict = {}
    for layout, channels_last in (("contiguous", False), ("channels_last", True)):
        stepper = Stepper(config, batches, device, channels_last)
        pipelined(stepper, 2, log_every, view_steps)  # warm-up: allocations, kernel choices
        best = max((pipelined(stepper, steps, log_every, view_steps) for _ in range(rounds)), key=lambda r: r[0])
        result[layout] = {"patches_per_s": best[0], "host_wait_share": best[1]}
        if channels_last:
            phases = breakdown(stepper, steps)
            step = sum(v for k, v in phases.items() if k != "loss")
            result["breakdown_s"] = phases
            result["views_share"] = phases["views"] / step
    result["ratio_channels_last"] = result["channels_last"]["patches_per_s"] / result["contiguous"]["patches_per_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="emp_ssl/fashion_mnist_demo")
    parser.add_argument("--size", type=int, help="image size (default 28 for 1 channel, else 32)")
    parser.add_argument("--batch", type=int, help="images per step (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=10, help="steps per round (default 10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=10, help="steps between host syncs (default 10)")
    parser.add_argument("--view-steps", type=int, help="steps of views per call (default: 4 on CUDA, 1 on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="a tiny network and 2 short rounds: checks that it runs")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the recipe")
    args = parser.parse_args(argv)
    overrides, config, device, channels, size = recipe_setup(args)
    batch = args.batch or (8 if args.smoke else config.data.batch_size)
    steps, rounds = (2, 1) if args.smoke else (args.steps, args.rounds)
    view_steps = args.view_steps or (4 if device.type == "cuda" else 1)
    batches = synthetic_batches(4, batch, size, channels)
    result = run(config, batches, device, steps=steps, rounds=rounds, log_every=min(args.log_every, steps),
                 view_steps=view_steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    phases = result["breakdown_s"]
    print(f"{args.recipe} on {name}, torch {torch.__version__}: {batch} images/step, "
          f"{batch * sum(s.count for s in view_specs_for(config, [0.5] * channels, [0.25] * channels))} patches/step")
    print(f"  pipelined, contiguous (reference)  {result['contiguous']['patches_per_s']:>12,.0f} patches/s")
    print(f"  pipelined, channels_last (default) {result['channels_last']['patches_per_s']:>12,.0f} patches/s   "
          f"{result['ratio_channels_last']:.2f}x; host waited for the device "
          f"{100 * result['channels_last']['host_wait_share']:.0f} % of the time")
    print("  breakdown (synchronised, ms/step): " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in phases.items())
          + f"; views {100 * result['views_share']:.1f} % of the step")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"recipe": args.recipe, "overrides": overrides, "device": name, "torch": torch.__version__,
                       "batch": batch, **result}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
