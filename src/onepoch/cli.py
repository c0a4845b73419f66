"""The ``onepoch`` command line.

User errors (:class:`onepoch.errors.OnepochError`) print one line ``onepoch: error: ...`` and exit
with status 2; ``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

from onepoch import __version__
from onepoch.config import parse_override, suggest
from onepoch.errors import ConfigError, DataError, OnepochError, one_line, warn

# The other onepoch modules are imported by the command that needs them, not here: most of them import
# torch, and `onepoch --help` (or a mistyped command) should answer without loading it.

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------------------------------
# onepoch prepare
# --------------------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from onepoch.atomic import remove_stale_staging
    from onepoch.data.prepared import check_out_dir, write_prepared
    from onepoch.data.sources import SOURCE_NAMES, locate_source

    if args.name not in SOURCE_NAMES:
        raise DataError(f"unknown dataset source {args.name!r}{suggest(args.name, SOURCE_NAMES)}; "
                        f"choose one of: {', '.join(SOURCE_NAMES)}")
    out = Path(args.out)
    # Refuse a non-dataset --out before spending time on the source.
    check_out_dir(out, args.name, None, force=True)
    for stale in remove_stale_staging(out):
        warn(f"removed {stale}, left by an earlier prepare that was killed")
    start = time.perf_counter()
    plan = locate_source(args.name, args.source, size=args.size, test_source=args.test_source,
                         test_fraction=args.test_fraction, grayscale=args.grayscale, seed=args.seed,
                         download=not args.no_download, layout=args.layout, max_side=args.max_side,
                         quality=args.quality, classes=args.classes, unlabelled=args.unlabelled)
    if check_out_dir(out, plan.name, plan.request, force=args.force):
        print(f"{out} already holds this prepared dataset ({plan.name}, from the same files); "
              "nothing to do (--force rebuilds it)")
        return 0
    data = plan.read()
    write_prepared(data, out, force=args.force)
    shapes = ", ".join(_split_summary(split, a) for split, a in data.splits.items())
    classes = "unlabelled" if args.unlabelled else f"{len(data.class_names)} classes"
    print(f"prepared {data.name} -> {out}: {shapes}, {classes} ({time.perf_counter() - start:.1f} s)")
    return 0


def _split_summary(split: str, arrays) -> str:
    if hasattr(arrays, "images"):  # raw arrays
        return f"{split} {arrays.images.shape[0]:,} x {'x'.join(map(str, arrays.images.shape[1:]))}"
    return f"{split} {arrays.count:,} JPEG"  # JPEG at rest


# --------------------------------------------------------------------------------------------------
# onepoch views
# --------------------------------------------------------------------------------------------------


ENCODED_VIEWS_RECIPE = "emp_ssl/imagenet100_1epoch"  # `onepoch views` default for a JPEG-at-rest dataset


def cmd_views(args: argparse.Namespace) -> int:
    import dataclasses

    import numpy as np

    from onepoch.data.prepared import open_split
    from onepoch.plots import figure_format
    from onepoch.views import load_view_spec
    from onepoch.views.tiles import column_titles, first_views, save_views_figure, view_tiles

    if args.images < 1 or args.views < 1:
        raise ConfigError("--images and --views must be >= 1")
    if args.spec and args.recipe:
        raise ConfigError("give --spec or --recipe, not both")
    figure_format(args.out)  # a bad extension fails before any work
    split = open_split(args.dataset, args.split)
    channels = split.shape[2]
    overrides = dict(parse_override(o) for o in args.overrides)
    recipe = args.recipe or (ENCODED_VIEWS_RECIPE if split.encoded and not args.spec else None)
    if recipe is not None:
        from onepoch.runconfig import load_config

        bases, source = list(load_config(recipe).view_specs), f"recipe {recipe}"
    else:
        spec_name = args.spec or ("emp_ssl_fashion_mnist" if channels == 1 else "emp_ssl_cifar")
        bases, source = [spec_name], f"spec {spec_name}"
    specs = []
    for base in bases:  # one per view group; shown un-normalised
        spec = load_view_spec(base, overrides)
        specs.append(dataclasses.replace(spec, mean=None, std=None, count=min(spec.count, args.views)))
    n = min(args.images, split.num_images)
    originals = np.array(split.images[:n])  # an encoded split: the evaluation view (resized, centre crop)
    # an encoded split's views as training cuts them: each image decoded once, at the scale its crops need
    groups = first_views(split, n, specs, args.seed)
    size = max(spec.size for spec in specs)
    zoom = args.zoom or max(1, math.ceil(64 / size))
    out = Path(args.out)
    save_views_figure(out, view_tiles(originals, groups), col_titles=column_titles(specs), zoom=zoom)
    sizes = ", ".join(dict.fromkeys(f"{spec.size}x{spec.size}" for spec in specs))
    print(f"wrote {out}: {n} images x {sum(spec.count for spec in specs)} views of {sizes} "
          f"({source}{', ' + ' '.join(args.overrides) if args.overrides else ''}"
          f"{'; JPEG at rest, decoded as in training' if split.encoded else ''})")
    return 0


# --------------------------------------------------------------------------------------------------
# onepoch train / eval / demo
# --------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from onepoch.runconfig import load_config
    from onepoch.train import train

    config = load_config(args.recipe, args.overrides)  # a bad config stops before any process starts
    if args.nproc != 1:
        return _launch(args, config)
    from onepoch.distributed import launched_world, stop

    if launched_world().main:
        print(f"run {config.run_dir}: {config.method['name']} on {config.data.root}, {config.model.arch} "
              f"(width {config.model.width}, {config.model.stem} stem), {config.train.epochs} epoch(s)")
    try:
        result = train(config, resume=True if args.resume else None)
    except BaseException:
        stop(wait=False)  # another rank may be gone: no barrier
        raise
    stop()  # every rank leaves the process group here, not at interpreter exit
    if not result.main:
        return 0  # rank 0 reports and evaluates
    if result.already_trained:
        print(f"run {result.run_dir} is already trained to step {result.steps} (nothing to do); "
              f"final loss {result.final_loss:.4f}")
    else:
        print(f"trained to step {result.steps} in {result.seconds:.1f} s ({result.patches_per_s:,.0f} patches/s); "
              f"final loss {result.final_loss:.4f}; run directory {result.run_dir}")
    if result.online_probe_test_acc is not None:
        print(f"online linear probe: {100 * result.online_probe_test_acc:.2f} % on the test split (one view per image)")
    if args.eval:
        from onepoch.eval import evaluate_run

        evaluate_run(result.run_dir)
        print(f"wrote {result.run_dir / 'eval.json'}")
    return 0


def _launch(args: argparse.Namespace, config) -> int:
    """``onepoch train ... --nproc N``: the same command in N processes started by PyTorch's own
    launcher (``python -m torch.distributed.run --standalone --nproc_per_node N -m onepoch train ...``),
    after the checks that need no process group."""
    import subprocess
    import sys

    import torch

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if config.data.batch_size % args.nproc:
        raise ConfigError(f"data.batch_size {config.data.batch_size} (the global batch) is not divisible by the "
                          f"{args.nproc} processes; use a multiple of {args.nproc}")
    cuda = config.train.device.startswith("cuda") or (config.train.device == "auto" and torch.cuda.is_available())
    if config.train.backend == "nccl" and not cuda:
        raise ConfigError("train.backend nccl needs CUDA devices, and none is available; use gloo (CPU)")
    if cuda and args.nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc {args.nproc} needs {args.nproc} GPUs, this machine has {torch.cuda.device_count()}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "onepoch", "train", args.recipe, *args.overrides,
               *(["--resume"] if args.resume else []), *(["--eval"] if args.eval else [])]
    return subprocess.call(command)


def _eval_overrides(args: argparse.Namespace) -> dict:
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.probe:
        overrides["eval.probes"] = [p.strip() for p in args.probe.split(",") if p.strip()]
    if args.features:
        overrides["eval.features"] = [f.strip() for f in args.features.split(",") if f.strip()]
    if args.bag_patches is not None:
        overrides["eval.bag_patches"] = args.bag_patches
    if args.protocol is not None:
        overrides["eval.protocol"] = args.protocol
    return overrides


def cmd_eval(args: argparse.Namespace) -> int:
    from onepoch.eval import evaluate_run, format_table

    report = evaluate_run(args.run_dir, overrides=_eval_overrides(args))
    rows = [(kind, entry) for kind, entry in report["results"].items()]
    print(format_table(rows))  # every result eval.json holds for this checkpoint, earlier ones included
    print(f"wrote {Path(args.run_dir) / 'eval.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import shlex

    from onepoch.compare import load_compare_config, run_compare

    config = load_compare_config(args.recipe, args.overrides)
    command = "onepoch compare " + " ".join(shlex.quote(a) for a in [args.recipe, *args.overrides])
    run_compare(config, command=command, fmt=args.format, report_only=args.report_only)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from onepoch.report import write_report

    write_report(args.run_dir, smooth=args.smooth, fmt=args.format)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from onepoch.export import export_backbone

    info = export_backbone(args.run, args.format, args.out, force=args.force)
    print(f"wrote {info['path']}: {info['arch']} backbone ({info['tensors']} tensors, {info['stem']} stem) "
          f"from {info['source']}")
    print(info["how_to_load"])
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from onepoch.embedding import embed_images

    start = time.perf_counter()
    result = embed_images(args.run, args.data, args.out, split=args.split, size=args.size, force=args.force,
                          batch_size=args.batch_size, device=args.device)
    n, dim = result.features.shape
    print(f"wrote {result.path}: {n:,} x {dim} float32 features of {args.data} "
          f"({time.perf_counter() - start:.1f} s); one image name per row in {result.files_path}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from onepoch.recipe_table import markdown_table

    print(markdown_table(), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from onepoch.demo import run_demo

    run_demo(data_root=Path(args.data), out=Path(args.out), overrides=args.overrides,
             download=not args.no_download)
    return 0


# --------------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onepoch",
        description="Fast self-supervised learning of image representations (EMP-SSL and baselines).",
    )
    parser.add_argument("--version", action="version", version=f"onepoch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("prepare", help="turn a dataset source into a prepared dataset directory",
                       description="Read a dataset source and write a prepared dataset atomically to --out: "
                       "uint8 .npy arrays + meta.json per split, or, for large images, the JPEG files kept as "
                       "they are (JPEG at rest: imagenette, imagenet, imagenet100, folder/npz with --layout jpeg).")
    p.add_argument("name", metavar="NAME",
                   help="raw arrays: fashion-mnist, mnist, cifar10, cifar100, folder, npz, tiny-imagenet (64x64), "
                   "stl10 (96x96; splits train, test, train+unlabeled); JPEG at rest: imagenette, imagenette-320, "
                   "imagenette-160, imagenet (no download: --source DIR), imagenet100")
    p.add_argument("--out", required=True, help="directory to write the prepared dataset to")
    p.add_argument("--source", help="where the source files are (default: known locations, "
                   "then a download for the built-in datasets)")
    p.add_argument("--test-source", help="folder: a second image folder for the test split")
    p.add_argument("--test-fraction", type=float, help="folder: fraction of each class held out "
                   "for the test split (default 0.2 without --test-source)")
    p.add_argument("--size", type=int, help="folder: output image size (resize shorter side, centre crop)")
    p.add_argument("--grayscale", action="store_true", help="folder: store one channel instead of RGB")
    p.add_argument("--seed", type=int, default=0, help="seed of the folder train/test split (default 0)")
    p.add_argument("--unlabelled", action="store_true", help="folder: every image at any depth, no class folders "
                   "needed; one split, train, marked unlabelled (train without the online probe; evaluate on a "
                   "labelled dataset, or use `onepoch embed`)")
    p.add_argument("--layout", choices=("raw", "jpeg"), help="folder, npz: raw uint8 arrays (default) or the "
                   "JPEG files kept as they are (jpeg)")
    p.add_argument("--max-side", type=int, metavar="N", help="JPEG at rest: re-encode images whose longer side "
                   "exceeds N, shrunk to N (default: keep every size)")
    p.add_argument("--quality", type=int, metavar="Q", help="JPEG at rest: JPEG quality of re-encoded images "
                   "(PNG, CMYK, rotated, oversized; default 95)")
    p.add_argument("--classes", metavar="FILE", help="imagenet, imagenette*, tiny-imagenet: keep only the classes "
                   "(wnids) listed in FILE, one per line")
    p.add_argument("--force", action="store_true", help="replace an existing prepared dataset at --out")
    p.add_argument("--no-download", action="store_true", help="never download; fail if no local files")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("views", help="write a figure of random views of a few images",
                       description="Render random views of the first images of a prepared dataset "
                       "into a figure (PNG, SVG or PDF after --out): one row per image, the original then its views. "
                       "For a JPEG-at-rest dataset the views are made as in training (each image decoded once, "
                       "its crops drawn on the stored full-size picture); the original is shown at its evaluation "
                       "size (shorter side resized, centre crop).")
    p.add_argument("dataset", metavar="DATASET", help="a prepared dataset directory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="ViewSpec fields to override, e.g. count=8 blur_p=1.0 crop_scale=[0.2,1]")
    p.add_argument("--spec", help="a preset (emp_ssl_cifar, emp_ssl_fashion_mnist) or a YAML file "
                   "of ViewSpec fields (default: the EMP-SSL preset for the dataset's channels; for a JPEG-at-rest "
                   f"dataset the views of the recipe {ENCODED_VIEWS_RECIPE})")
    p.add_argument("--recipe", help="take the views (every view group) of a training recipe: a YAML file or a "
                   "shipped name, e.g. emp_ssl/imagenet100_1epoch or byol/imagenet100")
    p.add_argument("--out", default="views.png", help="figure to write: .png, .svg or .pdf (default views.png)")
    p.add_argument("--split", default="train", help="split to take images from (default train)")
    p.add_argument("--images", type=int, default=8, help="number of images (rows, default 8)")
    p.add_argument("--views", type=int, default=10, help="at most this many views per image and view group "
                   "(default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the view generator (default 0)")
    p.add_argument("--zoom", type=int, help="pixel zoom of each view (default: views >= 64 px)")
    p.set_defaults(func=cmd_views)

    p = sub.add_parser("train", help="train a self-supervised model from a recipe",
                       description="Train from a YAML recipe (a file, or a shipped recipe name such as "
                       "emp_ssl/fashion_mnist_demo) with dotted KEY=VALUE overrides, e.g. "
                       "train.epochs=2 data.root=data/cifar10 optim.lr=0.1. The run directory is "
                       "<train.out>/<name>.")
    p.add_argument("recipe", metavar="RECIPE", help="a YAML file or a shipped recipe name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--eval", action="store_true", help="evaluate the run when training ends")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine (torch.distributed.run; one GPU each on CUDA)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run: linear probe and k-NN on its embeddings",
                       description="Embed the train and test splits with the run's newest checkpoint, "
                       "train the probes on those embeddings (choices made on a validation split of "
                       "the training set) and write eval.json into the run directory.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds config.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="eval.* overrides, e.g. eval.knn_k=50")
    p.add_argument("--probe", help="comma-separated probes: linear,knn")
    p.add_argument("--features", help="comma-separated feature kinds: bag,full,map2x2,grid")
    p.add_argument("--bag-patches", type=int, help="patches averaged per image for the bag of features")
    p.add_argument("--protocol", choices=("onepoch", "paper", "both"),
                   help="onepoch (default): probes chosen on a validation split; paper: EMP-SSL's official "
                   "evaluation on the bag (SGD linear probe, 100 epochs, last and best-on-test epoch; k-NN k=20, "
                   "T=0.07), reported only; both: the two on one bag embedding")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="train and evaluate several methods x budgets x seeds; compare.md + plots",
                       description="Run (or reuse, or resume) every cell of a comparison: each method of the "
                       "recipe at each budget (epochs, patch passes or seconds) and seed, all evaluated with the "
                       "same probes; then write compare.md, compare.json and plots into <out>/<name>. "
                       "Run it again after an interruption: finished cells are reused.")
    p.add_argument("recipe", metavar="RECIPE", help="a compare recipe: a YAML path or a shipped name "
                   "(compare/fashion_mnist_1epoch, compare/cifar10)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. data.root=data/fashion-mnist budgets=[1,3] seeds=[0,1] out=runs")
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="figure format (default png)")
    p.add_argument("--report-only", action="store_true", help="run nothing: write compare.md, compare.json and "
                   "the plots from the cells already finished (e.g. after another process wrote a partial report)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="report.md and figures for a run directory",
                       description="Write report.md into a run directory, with training curves, example views "
                       "and a 2-D PCA map of the test features coloured by class (PNG, SVG or PDF figures).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds config.yaml and metrics.jsonl)")
    p.add_argument("--smooth", type=int, default=20, help="steps in the moving average of noisy curves (default 20)")
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="figure format (default png)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write a run's backbone for torchvision, timm or as safetensors",
                       description="Write the backbone of a run (its newest checkpoint) or of a checkpoint file: "
                       "--format torchvision or timm writes a state_dict (torch.save) with their parameter names, "
                       "for a ResNet-18/34/50 with the ImageNet stem, width 1 and 3 channels, which loads with "
                       "strict=False leaving out only fc; --format safetensors writes any onepoch backbone with its "
                       "onepoch constructor in the file's metadata (onepoch.load_backbone reads it back).")
    p.add_argument("run", metavar="RUN", help="a run directory or a checkpoint file")
    p.add_argument("--format", required=True, choices=("torchvision", "timm", "safetensors"))
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embed", help="write the features of any image folder with a run's trained backbone",
                       description="Compute the backbone's features (the whole image, normalised as in training) "
                       "of every image of --data: an image folder, labelled or not (every PNG/JPEG at any depth, "
                       "resized as prepare folder does: shorter side to the image size, centre crop), or a "
                       "prepared dataset's --split. Writes --out (.npy, float32, one row per image) and beside it "
                       "FILE.files.txt for FILE.npy (one image name per row, in the same order).")
    p.add_argument("run", metavar="RUN", help="a run directory, a checkpoint file or an exported backbone")
    p.add_argument("--data", required=True, metavar="DIR", help="an image folder or a prepared dataset")
    p.add_argument("--out", required=True, metavar="FILE", help="the .npy file to write")
    p.add_argument("--split", default="train", help="a prepared dataset's split (default train)")
    p.add_argument("--size", type=int, metavar="N", help="image size (default: the resolution the run was "
                   "trained at; needed for an exported backbone)")
    p.add_argument("--batch-size", type=int, default=256, metavar="B", help="images per forward pass (default 256)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--force", action="store_true", help="replace --out (and its file list) if it exists")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("recipes", help="the table of shipped recipes: method, dataset, hardware, what each "
                       "reproduces, measured or not", description="Print the table of the recipes shipped with "
                       "onepoch (onepoch train NAME, onepoch compare compare/NAME) as Markdown, read from each "
                       "recipe's `about` entry: its method, dataset, the hardware it is sized for, what it "
                       "reproduces (a paper's row or our choice) and whether it was measured (the result and "
                       "the command that measured it). The README holds the same table.")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("demo", help="EMP-SSL for one epoch on Fashion-MNIST (CPU), evaluated against baselines",
                       description="Prepare Fashion-MNIST, train EMP-SSL for one epoch with the CPU-sized "
                       "recipe, then print linear-probe and k-NN accuracy next to a raw-pixel logistic "
                       "regression and the same network at random initialisation.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (e.g. train.max_steps=50)")
    p.add_argument("--data", default="data/fashion-mnist", help="prepared dataset directory (created if needed)")
    p.add_argument("--out", default="runs", help="parent of the run directory (default runs)")
    p.add_argument("--no-download", action="store_true", help="never download Fashion-MNIST")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after options (argparse stops collecting them at the first).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except OnepochError as e:
        if args.debug:
            traceback.print_exc()
        print(f"onepoch: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # the reader went away (`onepoch recipes | head`): nothing to report
        sys.stderr.close()
        return 0
    except OSError as e:  # the system refused (disk full, permission denied): the files written are intact
        if args.debug:
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"onepoch: error: {e.strerror or one_line(e)}{where} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("onepoch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
