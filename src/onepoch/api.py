"""The Python API, for notebooks and downstream code (also reachable as ``onepoch.<name>``)::

    import onepoch

    run = onepoch.train("emp_ssl/fashion_mnist_demo", data={"root": "data/fashion-mnist"}, train={"epochs": 0.1})
    report = onepoch.evaluate(run.run_dir, probes=["knn"], features=["full"])
    backbone = onepoch.load_backbone(run.run_dir, device="cpu")     # or an exported file
    features = onepoch.embed(backbone, images_uint8_nhwc)           # (N, feature_dim) float32
    emb = onepoch.embed_folder(run.run_dir, "photos/", out="photos.npy")  # any image folder: .features, .files
    onepoch.recipes()                                               # {name: one-line description}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onepoch.embedding import Embedding, backbone_features, embed_images
from onepoch.eval import evaluate_run
from onepoch.export import read_backbone
from onepoch.run import read_metrics
from onepoch.runconfig import RECIPES_DIR, load_config
from onepoch.train import train as run_training

__all__ = ["Embedding", "RunResult", "embed", "embed_folder", "evaluate", "load_backbone", "recipes", "train"]


@dataclass
class RunResult:
    """What :func:`train` returns: the run directory, the training summary and the trained method
    module (backbone + heads; ``model.backbone`` is the backbone)."""

    run_dir: Path
    steps: int
    seconds: float
    final_loss: float
    online_probe_test_acc: float | None
    model: nn.Module = field(repr=False)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The rows of the run's ``metrics.jsonl`` (one per logged step: loss, its parts, lr, patches/s)."""
        return read_metrics(self.run_dir)


def dotted_overrides(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Keyword overrides as dotted config keys: ``train={"epochs": 2}`` and ``**{"train.epochs": 2}`` both
    give ``{"train.epochs": 2}``; mappings are followed down, any other value is a leaf."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            out.update(dotted_overrides(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def train(recipe: str | Path, *, resume: bool | str | None = None, progress_bar: bool = True,
          **overrides) -> RunResult:
    """Train a recipe (a shipped name such as ``"emp_ssl/fashion_mnist_demo"`` or a YAML path) with
    overrides given as keywords (``data={"root": ...}``, ``train={"epochs": 0.5}``, ``name="x"``), like
    ``onepoch train RECIPE KEY=VALUE ...``; ``resume=True`` continues the run from its newest checkpoint
    (``resume`` as :func:`onepoch.train.train` takes it; None: the config's)."""
    config = load_config(recipe, dotted_overrides(overrides))
    result = run_training(config, resume=resume, progress_bar=progress_bar)
    return RunResult(run_dir=Path(result.run_dir), steps=result.steps, seconds=result.seconds,
                     final_loss=result.final_loss, online_probe_test_acc=result.online_probe_test_acc,
                     model=result.model)


def evaluate(run_dir: str | Path, *, log=print, **eval_keys) -> dict[str, Any]:
    """Evaluate a run's newest checkpoint as ``onepoch eval`` does, with ``eval.*`` keys as keywords
    (``probes=["linear", "knn"]``, ``features=["full"]``, ``knn_k=20``); returns what ``eval.json``
    holds (``report["results"][feature][probe]["test_acc"]``: earlier results of the same checkpoint kept) and
    ``report["evaluated"]``, this evaluation's results alone."""
    keys = {k if k.startswith("eval.") else f"eval.{k}": v for k, v in eval_keys.items()}
    return evaluate_run(run_dir, overrides=keys, log=log)


def load_backbone(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The backbone of a run directory (its newest checkpoint), a checkpoint file, or an exported file
    (``onepoch export``: safetensors, or a torchvision/timm state_dict), as an onepoch ResNet in eval
    mode on ``device``. It maps normalised images (N, C, H, W) to features (N, feature_dim); its
    ``normalization`` attribute holds the ``{"mean", "std"}`` its training inputs had (None if unknown),
    which :func:`embed` applies."""
    model, info = read_backbone(path)
    model.normalization = info.get("normalization")
    return model.to(device).eval()


def embed(model: nn.Module, images, *, batch_size: int = 256, mean=None, std=None,
          device: str | torch.device | None = None) -> torch.Tensor:
    """Features of ``images`` from ``model`` (a backbone, e.g. from :func:`load_backbone`): float32 on the
    CPU, one row per image.

    ``images``: uint8 (N, H, W, C) (a numpy array or tensor, as in a prepared dataset), scaled to
    [0, 1] and normalised ``(x - mean) / std`` per channel with ``mean``/``std`` if given, else the
    model's ``normalization``, else left in [0, 1]; or a float tensor (N, C, H, W), used as it is.
    Computed in batches of ``batch_size`` on ``device`` (default: where the model is), model in eval mode.
    For the images of a folder or a prepared dataset, see :func:`embed_folder`.
    """
    return backbone_features(model, images, batch_size=batch_size, mean=mean, std=std, device=device)


def embed_folder(run: str | Path, data: str | Path, out: str | Path | None = None, *, split: str = "train",
                 size: int | None = None, force: bool = False, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> Embedding:
    """The features of every image of ``data`` (an image folder, labelled or not, any depth; or a prepared
    dataset's ``split``) from the trained backbone of ``run`` (a run directory, checkpoint or export), as
    ``onepoch embed RUN --data DIR --out FILE`` computes them: ``.features`` float32 (N, D), ``.files`` the
    name of each row's image. With ``out`` (a ``.npy`` path) they are also written there, with the file list
    beside it (``FILE.files.txt`` for ``FILE.npy``); an existing file is replaced only with ``force=True``.
    ``size``: the image size (default: the resolution the run was trained at)."""
    return embed_images(run, data, out, split=split, size=size, force=force, batch_size=batch_size, device=device)


def _summary(path: Path, width: int = 110) -> str:
    """The first comment line of a recipe file, without a trailing colon, cut to ``width`` characters."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().rstrip(":")
            return text if len(text) <= width else text[:width - 3].rsplit(" ", 1)[0] + "..."
        if line.strip():
            break
    return "(no description)"


def recipes() -> dict[str, str]:
    """The shipped recipes, ``{name: one-line description}``: run recipes (``onepoch train NAME``) then
    comparisons (``onepoch compare compare/NAME``)."""
    paths = sorted(RECIPES_DIR.rglob("*.yaml"), key=lambda p: (p.parent.name == "compare", str(p)))
    return {str(p.relative_to(RECIPES_DIR).with_suffix("")): _summary(p) for p in paths}
