"""The run configuration: a YAML recipe plus dotted ``key=value`` overrides, checked key by key.

```
name: emp_ssl_fashion_mnist
seed: 0
data:   {root: data/fashion-mnist, batch_size: 100, limit: null}
views:  {preset: emp_ssl_fashion_mnist, count: 16}     # a preset and/or any ViewSpec field
        # or view groups: {preset: simclr_cifar, groups: [{count: 1, blur_p: 1.0}, {count: 1, blur_p: 0.1}]}
model:  {arch: resnet18, stem: cifar, width: 1.0}
method: {name: emp_ssl, eps: 0.2, invariance_weight: 200}   # the method's own keys
optim:  {name: lars, lr: 0.3, weight_decay: 1e-4, warmup_steps: 0.05}
train:  {epochs: 1, checkpoint_every: 100, out: runs}
eval:   {bag_patches: 16, knn_k: [10, 20, 50], probes: [linear, knn, mlp]}
```

Unknown keys are errors that name the key (with a "did you mean"). A recipe name such as
``emp_ssl/fashion_mnist_demo`` refers to the YAML files shipped in ``onepoch/configs/``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from onepoch import methods
from onepoch.config import _coerce, dataclass_from_dict, parse_override, suggest
from onepoch.errors import ConfigError
from onepoch.models import BACKBONES as ARCHS
from onepoch.models import STEMS
from onepoch.views import load_view_spec

RECIPES_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    root: str = "data/fashion-mnist"   # a prepared dataset (``onepoch prepare``)
    train_split: str = "train"
    test_split: str = "test"
    batch_size: int = 100              # images per step (each gives views.count patches)
    limit: int | None = None           # use only the first N training images (smoke tests)
    test_limit: int | None = None      # evaluate on only the first N test images
    image_size: int | None = None      # JPEG-at-rest datasets: the evaluation resolution (shorter side
                                       # resized to it, centre crop); null: the dataset's eval_size
    decode_threads: int = 0            # JPEG-at-rest datasets: decoding threads (0: up to 8, one per core)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.decode_threads < 0:
            raise ConfigError(f"data.decode_threads must be >= 0, got {self.decode_threads}")
        for key in ("limit", "test_limit", "image_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1 or null, got {getattr(self, key)}")


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    stem: str = "cifar"
    width: float = 1.0
    sync_bn: bool = True               # with several processes: BatchNorm statistics over the global batch

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown model.arch {self.arch!r}{suggest(self.arch, ARCHS)}; "
                              f"choose one of: {', '.join(ARCHS)}")
        if self.stem not in STEMS:
            raise ConfigError(f"unknown model.stem {self.stem!r}{suggest(self.stem, STEMS)}; "
                              f"choose one of: {', '.join(STEMS)}")
        if not (self.width > 0 and math.isfinite(self.width)):
            raise ConfigError(f"model.width must be a finite number > 0, got {self.width}")


@dataclass
class OptimConfig:
    name: str = "lars"
    lr: float = 0.3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    trust_coefficient: float = 0.005
    warmup_steps: float = 0.0          # a step count, or a fraction of all steps when < 1
    final_lr_ratio: float = 0.0
    schedule_epochs: float | None = None  # epochs the warmup-cosine schedule spans (null: train.epochs); the
                                       # official EMP-SSL command anneals over 30 and reports each epoch's checkpoint
    norm_bias_lr_scale: float = 1.0    # lr multiplier of biases and norm parameters (Barlow Twins: 0.0048/0.2)

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.lr}")
        for key in ("weight_decay", "momentum", "warmup_steps", "final_lr_ratio", "norm_bias_lr_scale"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key} must be >= 0, got {getattr(self, key)}")
        if self.schedule_epochs is not None and not (self.schedule_epochs > 0 and math.isfinite(self.schedule_epochs)):
            raise ConfigError(f"optim.schedule_epochs must be a finite number > 0 or null, got {self.schedule_epochs}")


@dataclass
class TrainConfig:
    epochs: float = 1                  # may be fractional (equal-budget comparisons): round(epochs x steps per epoch) steps
    max_steps: int | None = None       # stop early after this many steps (the schedule still spans them)
    checkpoint_every: int = 100        # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    device: str = "auto"               # auto: cuda when available
    amp: str | bool = "auto"           # auto: bf16 autocast on CUDA, off on CPU; or bf16 / off
    channels_last: str | bool = "auto"  # auto / on: NHWC memory format (faster on CPU too, benchmarks/train_step.py); off
    compile: bool = False              # torch.compile the model
    threads: int | None = None         # CPU threads (torch.set_num_threads)
    online_probe: bool | None = None   # a linear classifier on detached backbone features of the first view;
                                       # null: on when the training split is labelled, off (said once) when not
    online_probe_lr: float = 1e-3      # its own Adam optimizer
    log_every: int = 10                # steps between host syncs: metrics lines, progress bar, non-finite check
    resume: str | bool = "off"         # off | on (continue the run) | auto (continue it if it has a checkpoint)
    backend: str = "auto"              # several processes: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    view_steps: int | None = None      # steps of views rendered per call (null: 4 on CUDA, 1 on CPU); same views either way
    out: str = "runs"                  # the run directory is <out>/<name>
    log_to: tuple[str, ...] | str = ("jsonl",)  # also tensorboard (pip install "onepoch[tensorboard]"):
                                                # <run dir>/tensorboard; metrics.jsonl is always written

    def __post_init__(self):
        targets = (self.log_to,) if isinstance(self.log_to, str) else tuple(self.log_to)
        for target in targets:
            if target not in LOG_TARGETS:
                raise ConfigError(f"unknown train.log_to entry {target!r}{suggest(target, LOG_TARGETS)}; "
                                  f"choose from: {', '.join(LOG_TARGETS)}")
        self.log_to = ("jsonl", *dict.fromkeys(t for t in targets if t != "jsonl"))
        if not self.epochs > 0 or not math.isfinite(self.epochs):
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs}")
        if self.epochs == int(self.epochs):
            self.epochs = int(self.epochs)
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("train.checkpoint_every and train.keep_checkpoints must be >= 1")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1, got {self.log_every}")
        if self.view_steps is not None and self.view_steps < 1:
            raise ConfigError(f"train.view_steps must be >= 1 or null, got {self.view_steps}")
        # YAML reads an unquoted on / off (train.amp=off on the command line) as true / false
        if isinstance(self.resume, bool):
            self.resume = "on" if self.resume else "off"
        if isinstance(self.channels_last, bool):
            self.channels_last = "on" if self.channels_last else "off"
        if self.amp is False:
            self.amp = "off"
        for key, choices in (("amp", ("auto", "bf16", "off")), ("channels_last", ("auto", "on", "off")),
                             ("resume", ("off", "on", "auto")), ("backend", ("auto", "nccl", "gloo"))):
            if getattr(self, key) not in choices:
                raise ConfigError(f"train.{key} must be one of {', '.join(choices)}, got {getattr(self, key)!r}")


@dataclass
class EvalConfig:
    features: tuple[str, ...] = ("bag", "full")  # see onepoch.eval: bag, full, map2x2, grid
    layer: str = "auto"                # bag/full read: auto (pre_feature for EMP-SSL, else backbone), backbone,
                                       # pre_feature (EMP-SSL), projector
    bag_patches: int = 16
    probes: tuple[str, ...] = ("linear", "knn")  # also mlp (one hidden layer: the non-linear probe)
    knn_k: int | tuple[int, ...] = (10, 20, 50)              # a value, or a list swept on validation
    knn_temperature: float | tuple[float, ...] = (0.04, 0.07, 0.1)
    val_fraction: float = 0.1
    linear_weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    linear_epochs: tuple[int, ...] = (10, 30)
    mlp_hidden: tuple[int, ...] = (512,)
    mlp_dropouts: tuple[float, ...] = (0.0, 0.5)
    mlp_weight_decays: tuple[float, ...] = (0.0,)
    mlp_epochs: tuple[int, ...] = (5, 10)
    batch_size: int = 500              # images per embedding batch (a bag draws its views per batch)
    max_patches: int | None = None     # most patches (or images) through the network at once: bounds memory;
                                       # None: 8192 on CUDA, 1024 on the CPU (cache-sized pieces ran 1.4-1.9x faster
                                       # there, `python benchmarks/eval.py` compares the two)
    amp: str | bool = "auto"           # the network's precision while embedding: bf16 autocast, off (float32), or
                                       # auto: bf16 when training's precision is bf16, or when train.amp is auto and
                                       # the CPU runs bf16 natively (AMX); docs/evaluation.md has what it changes
    seed: int = 0
    protocol: str = "onepoch"          # onepoch: the probes above, chosen on validation; paper: EMP-SSL's official
                                       # probes (onepoch.paper_probes) on the bag of bag_patches, reported only,
                                       # never used to choose; both: the two on one shared bag embedding

    def __post_init__(self):
        if self.bag_patches < 1:
            raise ConfigError(f"eval.bag_patches must be >= 1, got {self.bag_patches}")
        if self.batch_size < 1 or (self.max_patches is not None and self.max_patches < 1):
            raise ConfigError(f"eval.batch_size and eval.max_patches must be >= 1, got {self.batch_size} and "
                              f"{self.max_patches}")
        if self.amp is False:  # YAML reads an unquoted off as false
            self.amp = "off"
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"eval.amp must be one of auto, bf16, off, got {self.amp!r}")
        for key in ("knn_k", "knn_temperature"):
            values = getattr(self, key)
            if isinstance(values, tuple) and not values:
                raise ConfigError(f"eval.{key} must be a value or a non-empty list")
            if any(not v > 0 for v in (values if isinstance(values, tuple) else (values,))):
                raise ConfigError(f"eval.{key} must be > 0, got {values}")
        for key in ("linear_epochs", "mlp_hidden", "mlp_epochs"):
            if not getattr(self, key) or any(v < 1 for v in getattr(self, key)):
                raise ConfigError(f"eval.{key} must be a non-empty list of values >= 1, got {list(getattr(self, key))}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"eval.val_fraction must lie in (0, 1), got {self.val_fraction}")
        for f in self.features:
            if f not in FEATURE_KINDS:
                raise ConfigError(f"unknown eval.features entry {f!r}{suggest(f, FEATURE_KINDS)}; "
                                  f"choose from: {', '.join(FEATURE_KINDS)}")
        if self.layer not in LAYERS:
            raise ConfigError(f"unknown eval.layer {self.layer!r}{suggest(self.layer, LAYERS)}; "
                              f"choose from: {', '.join(LAYERS)}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown eval.protocol {self.protocol!r}{suggest(self.protocol, PROTOCOLS)}; "
                              f"choose from: {', '.join(PROTOCOLS)}")
        for p in self.probes:
            if p not in PROBE_KINDS:
                raise ConfigError(f"unknown eval.probes entry {p!r}{suggest(p, PROBE_KINDS)}; "
                                  f"choose from: {', '.join(PROBE_KINDS)}")


FEATURE_KINDS = ("bag", "full", "map2x2", "grid")
PROTOCOLS = ("onepoch", "paper", "both")
LOG_TARGETS = ("jsonl", "tensorboard")
LAYERS = ("auto", "backbone", "pre_feature", "projector")
PROBE_KINDS = ("linear", "knn", "mlp")


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    views: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "emp_ssl"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        def plain(v):
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v
        return plain(dataclasses.asdict(self))

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out) / self.name

    @cached_property
    def method_config(self) -> Any:
        """The method's config dataclass (e.g. ``EmpSSLConfig``), parsed once from ``method``."""
        entry = methods.get(self.method["name"])
        return dataclass_from_dict(entry.config_class, {k: v for k, v in self.method.items() if k != "name"},
                                   where="method")

    @cached_property
    def view_specs(self) -> tuple:
        """The ViewSpec of each view group (one unless ``views.groups``), parsed once from ``views``;
        without the dataset's normalisation, which :func:`onepoch.run.view_specs_for` adds."""
        return tuple(load_view_spec(preset, keys) for preset, keys in view_groups(self.views))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig,
            "eval": EvalConfig}
TOP_KEYS = ("name", "seed", "data", "views", "model", "method", "optim", "train", "eval")


def resolve_recipe(recipe: str | Path) -> Path:
    """A YAML path, or the name of a shipped recipe (``emp_ssl/fashion_mnist_demo``)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    shipped = RECIPES_DIR / f"{recipe}.yaml" if path.suffix == "" else RECIPES_DIR / path
    if shipped.exists():
        return shipped
    if path.exists():
        return path
    known = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
    missing = f"recipe {str(recipe)!r} not found: not a file, nor a shipped recipe"
    close = suggest(str(recipe), known)
    if close:  # the suggestion alone: a list of every recipe after it would bury it
        raise ConfigError(f"{missing}{close}")
    folder = str(recipe).split("/")[0]
    same = [k for k in known if k.startswith(f"{folder}/")]
    if same:
        raise ConfigError(f"{missing}; the shipped {folder} recipes: {', '.join(same)}")
    raise ConfigError(f"{missing}; `onepoch recipes` lists the shipped ones")


ABOUT_KEY = "about"  # a recipe's description (hardware, what it reproduces, measured or not): not config


def read_recipe(recipe: str | Path, *, with_about: bool = False) -> dict[str, Any]:
    """The mapping a recipe file holds, without its ``about`` entry (which describes the recipe: see
    :mod:`onepoch.recipes`) unless ``with_about``."""
    path = resolve_recipe(recipe)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    if not with_about:
        data.pop(ABOUT_KEY, None)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any],
                    top_keys: tuple[str, ...] = TOP_KEYS) -> dict[str, Any]:
    """``data`` with dotted ``a.b=value`` overrides applied (a new dict); the first part of each key
    must be one of ``top_keys``."""
    data = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".")
        if parts[0] not in top_keys:
            raise ConfigError(f"unknown config key {key!r}{suggest(parts[0], top_keys)}")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key {'.'.join(parts[:i + 1])!r} is a value, not a section, in {key!r}")
            node = child
        node[parts[-1]] = value
    return data


def build_config(data: dict[str, Any]) -> RunConfig:
    """Check a config dict key by key (sections, method keys, view keys) and build a RunConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"unknown config key {key!r}{suggest(str(key), TOP_KEYS)}")
    values: dict[str, Any] = {}
    for key, kind in (("name", str), ("seed", int)):
        if key in data:
            values[key] = _coerce(data[key], kind, key)
    if values.get("seed", 0) < 0:  # numpy's and torch's generators take no negative seed
        raise ConfigError(f"seed must be >= 0, got {values['seed']}")
    if "name" in values and (not values["name"] or "/" in values["name"] or values["name"] in (".", "..")):
        raise ConfigError(f"name must be a plain directory name, got {values['name']!r}")
    for key, cls in SECTIONS.items():
        values[key] = dataclass_from_dict(cls, data.get(key) or {}, where=key)
    method = dict(data.get("method") or {})
    if not isinstance(method, dict):
        raise ConfigError("method must be a mapping with a 'name' key")
    method.setdefault("name", "emp_ssl")
    views = data.get("views") or {}
    if not isinstance(views, dict):
        raise ConfigError(f"views must be a mapping of view keys, got {type(views).__name__}")
    config = RunConfig(**values, method=method, views=dict(views))
    # Parse the method's keys and the view groups now (unknown keys and bad values are errors), and
    # store the method's full, explicit set of keys.
    config.method = {"name": methods.get(method["name"]).name, **dataclasses.asdict(config.method_config)}
    specs = config.view_specs  # parsed and cached
    total = sum(spec.count for spec in specs)
    if total < 2:  # every method compares views of one image (EMP-SSL's invariance term too)
        given = f"views.count={specs[0].count}" if len(specs) == 1 else f"{len(specs)} group(s) in views.groups"
        raise ConfigError(f"{config.method['name']} compares views of the same image and needs at least 2 views per "
                          f"image; the views section gives {total} ({given}); use views.count=2 or more")
    return config


def views_per_image(views: dict[str, Any]) -> int:
    """Views of each image per step, over all view groups of a ``views`` section."""
    return sum(load_view_spec(preset, keys).count for preset, keys in view_groups(views))


def view_groups(views: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """The ``(preset, keys)`` of each view group of a ``views`` section.

    Without ``groups`` there is one group: the section's preset and keys. With ``groups`` (a list of
    mappings, e.g. BYOL's two asymmetric views or SwAV's large and small crops) each group is the
    section's preset and keys with the group's own keys (its ``preset`` too) on top.
    """
    views = dict(views)
    groups = views.pop("groups", None)
    preset = views.pop("preset", None)
    if groups is None:
        return [(preset, views)]
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise ConfigError("views.groups must be a non-empty list of mappings of view keys, "
                          "e.g. [{count: 1, blur_p: 1.0}, {count: 1, blur_p: 0.1}]")
    out = []
    for group in groups:
        group = dict(group)
        out.append((group.pop("preset", preset), {**views, **group}))
    return out


def load_config(recipe: str | Path | None, overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """The RunConfig of a recipe (or the defaults) with overrides applied."""
    data = read_recipe(recipe) if recipe is not None else {}
    return build_config(apply_overrides(data, overrides))
