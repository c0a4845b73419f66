"""The methods learn: one short epoch of EMP-SSL and of SimCLR on real data (a Fashion-MNIST subset from
Debian's ``dataset-fashion-mnist``), each with its shipped recipe's optimizer (LARS, warmup + cosine),
loss and heads, gives features on which k-NN classifies the test images better than the same network at
its random initialisation does, by more than the seed-to-seed spread of that random initialisation.

Measured on the 2-core development CPU, one run at a time with ``train.threads=1``, with ``knn_gain`` and the
settings below (``python tests/test_learning.py METHOD 0,1,2,3 train.threads=1``; seeds 1-3 were run through
the same function from a calibration script, seed 0 also with this command, which gave the same numbers),
k-NN test accuracy %, random init -> trained (gain):

| seed | EMP-SSL (6,000 images, 8 patches, 240 steps) | SimCLR (30,000 images, 16x16 views, 600 steps) |
| ---: | -------------------------------------------- | ---------------------------------------------- |
|    0 | 72.96 -> 77.66 (+4.70)                       | 72.96 -> 75.97 (+3.01)                         |
|    1 | 68.31 -> 77.94 (+9.63)                       | 68.31 -> 75.66 (+7.35)                         |
|    2 | 70.01 -> 76.71 (+6.70)                       | 70.01 -> 75.46 (+5.45)                         |
|    3 | 72.54 -> 77.16 (+4.62)                       | 72.54 -> 74.46 (+1.92)                         |

The seed-to-seed spread is the random initialisation's: its k-NN accuracy has a standard deviation of
2.35 points over seeds 0-2 (2.19 over 0-3; 1.79 over 0-7, measured earlier), against 0.64 (EMP-SSL) and
0.26 (SimCLR) for the trained networks over seeds 0-2. Over seeds 0-2 every gain is larger than that
spread (EMP-SSL: +4.70 at least, SimCLR: +3.01 at least), and the bars below are above it: 3.0 points for
EMP-SSL (about two thirds of its smallest gain), 2.4 for SimCLR (the spread, rounded up). Seed 0, the one
tested, has the best random init of the eight measured, so its gain is the hardest. The honest caveat:
SimCLR's margin is thin. Its seed-3 gain, +1.92, is below the spread, and at seed 0 it clears its bar by
0.6 points, about two of its trained runs' standard deviations over seeds 0-2 (0.65 over 0-3).
A method that does not learn scores exactly its random-init accuracy (gain 0) and fails. Each case takes
about a minute (65 s for SimCLR, 72 s for EMP-SSL under pytest, with another job on the second core).

How the settings were found (seed 0 unless stated, gains in points, 53-95 s a run on the shared CPU): SimCLR
with its recipe's 28x28 views on 10,000 images (200 steps of 50) gained +1.85 (seeds 0-3: +1.85, +6.17,
+4.86, +0.96), below the spread; 20,000 images +1.94; batches of 25 or 100 instead of 50 +0.40 and +0.66;
LARS lr 0.1 / 1.0 / 2.0 instead of 0.3: +1.29 / +2.23 / +0.77; temperature 0.5 -1.00; a swept k and T +1.72.
Rendering its views at 16x16 (EMP-SSL's patch size; the network is fully convolutional and the features are
still read on the whole 28x28 image) makes a step about 2.5 times cheaper, so about the same time trains
30,000 images: +3.01 (with 20,000: +1.18; in batches of 100: +1.16; with lr 1.0: +4.00, seeds 1-3 +5.62,
+5.57, +2.57, no more robust than the recipe's lr, so the recipe's lr is kept). Re-estimating the random
network's BatchNorm statistics on the bank lowers its accuracy (seeds 0-3: 66 +- 1.9 %) without narrowing
the spread; a network twice as wide narrows it (1.26 over seeds 0-3, measured at random init only; training
it was not tried, at about 4x the multiply-adds per image). EMP-SSL with the demo's 8 patches on 6,000
images replaced 16 patches on 3,000 (the same time; seeds 0-3 then: +3.60, +7.94, +6.08, +3.05).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from onepoch.eval import evaluate_model
from onepoch.run import build_model, open_eval_splits, view_spec_for
from onepoch.runconfig import load_config
from onepoch.train import train

FASHION = Path("/usr/share/datasets/fashion-mnist")

# One short epoch of a subset (6,000 images for EMP-SSL, 30,000 for SimCLR) with each shipped recipe's optimizer,
# loss and heads (LARS lr 0.3, 5 % warmup then cosine; SimCLR's NT-Xent at temperature 0.2 on its two views,
# EMP-SSL's 8 patches of 16x16), pinned to the CPU-sized network both recipes ship today (ResNet-10 width 0.25,
# CIFAR stem), with batches smaller than the recipes' 100 so that the short epoch has 240-600 steps, and
# SimCLR's views rendered at 16x16 instead of 28x28 (about 2.5x fewer seconds per step; the module docstring
# says why). k-NN (k 20, T 0.07, cosine, weighted) on the backbone output of the whole 28x28 image, the first
# BANK training images as the labelled bank, the 10,000 test images as queries.
COMMON = ["model.arch=resnet10", "model.width=0.25", "model.stem=cifar", "train.epochs=1", "train.threads=1",
          "train.online_probe=false", "train.checkpoint_every=1000", "eval.features=[full]", "eval.probes=[knn]",
          "eval.knn_k=20", "eval.knn_temperature=0.07"]
RECIPES = {"emp_ssl": ("emp_ssl/fashion_mnist_demo", ["views.count=8", "views.size=16", "data.limit=6000",
                                                       "data.batch_size=25"]),
           "simclr": ("simclr/fashion_mnist_1epoch", ["views.size=16", "data.limit=30000", "data.batch_size=50"])}
BANK = 3000
# Trained minus random-init k-NN test accuracy at seed 0 must exceed this (the module docstring says why).
MARGIN = {"emp_ssl": 0.03, "simclr": 0.024}


def knn_gain(method: str, data_root: Path, out: Path, seed: int, extra: tuple[str, ...] = ()
             ) -> tuple[float, float]:
    """(k-NN test accuracy of the network at its random initialisation, the same after one epoch of
    ``method``'s recipe on the subset of ``RECIPES``).

    The random-init network is built exactly as ``train`` builds its starting point
    (``torch.manual_seed(seed)`` then ``build_model``), so the two differ only by the training."""
    recipe, overrides = RECIPES[method]
    config = load_config(recipe, [f"data.root={data_root}", f"train.out={out}", f"seed={seed}", f"name=seed{seed}",
                                  *COMMON, *overrides, *extra])
    train_split, test_split = open_eval_splits(config)
    bank = train_split.subset(BANK)
    spec = view_spec_for(config, train_split.mean, train_split.std)

    def knn(model) -> float:
        results = evaluate_model(model, config, device=torch.device("cpu"), train_split=bank, test_split=test_split,
                                 spec=spec, log=lambda *a: None)
        return results["full"]["knn"]["test_acc"]

    torch.manual_seed(config.seed)
    before = knn(build_model(config, train_split.shape[-1]))
    after = knn(train(config, progress_bar=False).model)
    return before, after


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    from onepoch.demo import ensure_fashion_mnist

    return ensure_fashion_mnist(tmp_path_factory.mktemp("data") / "fashion-mnist", download=False,
                                log=lambda *a: None)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_one_short_epoch_beats_random_init_on_knn(fashion, tmp_path, method):
    before, after = knn_gain(method, fashion, tmp_path, seed=0)
    assert after - before > MARGIN[method], (method, before, after)


if __name__ == "__main__":  # the measurement behind MARGIN: python tests/test_learning.py METHOD SEEDS [KEY=VALUE ...]
    import sys
    import tempfile
    import time

    from onepoch.demo import ensure_fashion_mnist

    method, seeds, extra = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], tuple(sys.argv[3:])
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_fashion_mnist(Path(tmp) / "fashion-mnist", download=False, log=lambda *a: None)
        for seed in seeds:
            t0 = time.perf_counter()
            before, after = knn_gain(method, root, Path(tmp) / method, seed, extra)
            print(f"{method} seed {seed} {' '.join(extra)}: random init {100 * before:.2f} %, trained {100 * after:.2f} %, "
                  f"gain {100 * (after - before):+.2f} points ({time.perf_counter() - t0:.0f} s)", flush=True)
