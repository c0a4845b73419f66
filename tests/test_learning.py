"""The methods learn: one short epoch of EMP-SSL and of SimCLR on real data (a Fashion-MNIST subset from
Debian's ``dataset-fashion-mnist``), each with its shipped recipe and so its optimizer (LARS, warmup +
cosine), gives features on which k-NN classifies the test images better than the same network at its
random initialisation does.

Measured on the 2-core development CPU (``python tests/test_learning.py METHOD 0,1,2,3 train.threads=1``),
k-NN test accuracy %, random init -> trained (gain):

| seed | EMP-SSL (3,000 images, 120 steps) | SimCLR (10,000 images, 200 steps) |
| ---: | --------------------------------- | --------------------------------- |
|    0 | 72.96 -> 76.56 (+3.60)            | 72.96 -> 74.81 (+1.85)            |
|    1 | 68.31 -> 76.25 (+7.94)            | 68.31 -> 74.48 (+6.17)            |
|    2 | 70.01 -> 76.09 (+6.08)            | 70.01 -> 74.87 (+4.86)            |
|    3 | 72.54 -> 75.59 (+3.05)            | 72.54 -> 73.50 (+0.96)            |

The random-init network varies with the seed far more than the trained one: over seeds 0-7 its k-NN
accuracy is 70.77 +- 1.79 % (68.31 to 72.96), and seed 0, the one tested, is the best of the eight; the
trained accuracies vary by 0.4 (EMP-SSL) and 0.6 points (SimCLR). EMP-SSL's bar, a 2.0-point gain, is
above that seed-to-seed spread of the random init and below every measured gain. SimCLR learns more
slowly in its first steps: its bar is 0.5 points, below that spread (twice the images, 400 steps, gave
+1.94 at seed 0 and +2.83 at seed 3, so a larger bar would need most of a real epoch); a SimCLR that does
not learn scores exactly its random-init accuracy (gain 0) and fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from onepoch.eval import evaluate_model, open_eval_splits
from onepoch.runconfig import load_config
from onepoch.train import build_model, train, view_spec_for

FASHION = Path("/usr/share/datasets/fashion-mnist")

# One short epoch of a few thousand images with each shipped recipe as it is (LARS lr 0.3, 5 % warmup then
# cosine; SimCLR's two 28x28 views, EMP-SSL's 16 patches of 16x16), pinned to the CPU-sized network both
# recipes ship today (ResNet-10 width 0.25, CIFAR stem), with batches smaller than the recipes' 100 so
# that the short epoch has 120-200 steps. k-NN (k 20, T 0.07, cosine, weighted) on the backbone output of
# the whole image, the first BANK training images as the labelled bank, the 10,000 test images as queries.
COMMON = ["model.arch=resnet10", "model.width=0.25", "model.stem=cifar", "train.epochs=1", "train.threads=1",
          "train.online_probe=false", "train.checkpoint_every=1000", "eval.features=[full]", "eval.probes=[knn]",
          "eval.knn_k=20", "eval.knn_temperature=0.07"]
RECIPES = {"emp_ssl": ("emp_ssl/fashion_mnist_demo", ["views.count=16", "views.size=16", "data.limit=3000",
                                                       "data.batch_size=25"]),
           "simclr": ("simclr/fashion_mnist_1epoch", ["data.limit=10000", "data.batch_size=50"])}
BANK = 3000
# Trained minus random-init k-NN test accuracy at seed 0 must exceed this (the module docstring says why).
MARGIN = {"emp_ssl": 0.02, "simclr": 0.005}


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
