"""``fastcbm salf <verb>``: SALF-CBM (spatially-aware label-free concept bottleneck) on your images or the testbed.

``train`` fits a model from a precompute cache (``fastcbm precompute ... --features BACKBONE``), ``evaluate`` scores
it (accuracy, sparsity, zero-shot segmentation), ``explain`` explains one image or a folder (or serves the
explanation from an exported graph, ``--engine``), ``demo`` runs everything on the synthetic testbed (also
``fastcbm demo``, the README's main job). Thin: torch-heavy imports stay inside the run functions; the logic lives in
:mod:`fastcbm.salf`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fastcbm.commands import (config_from_args, config_option, help_without_subcommand, positive,
                              refuse_other_method, signature_defaults)
from fastcbm.errors import InvalidArgument, MissingFile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "salf", help="SALF-CBM: train / evaluate / explain a concept bottleneck model, or run its testbed demo",
        description="SALF-CBM predicts through named concepts with spatial concept maps. Start with 'fastcbm "
                    "precompute --data DIR --model CLIP --features BACKBONE --out CACHE', then 'fastcbm salf train "
                    "--cache CACHE --concepts FILE --out MODEL'; or see it end to end with 'fastcbm salf demo'.")
    sub = p.add_subparsers(dest="salf_command", metavar="<verb>")
    help_without_subcommand(p)
    register_train(sub)
    register_evaluate(sub)
    register_explain(sub)
    register_demo(sub)


# ---- fastcbm salf train (fastcbm.salf.train) --------------------------------------------------------------------
def register_train(sub: argparse._SubParsersAction) -> None:
    from fastcbm.concepts import PRESENCE_CUTOFFS
    from fastcbm.salf.train import TrainConfig, train_salf_from_cache

    d, run_defaults = TrainConfig(), signature_defaults(train_salf_from_cache)
    f, b = d.filter, d.fit.bottleneck
    p = sub.add_parser(
        "train", help="train a SALF-CBM on your images from a precompute cache (made with --features)",
        description="Trains the concept bottleneck (fused cubic-cosine loss, batches streamed from the cache) and the "
        "sparse head on a cache written by 'fastcbm precompute --data DIR --model CLIP --features BACKBONE'. "
        "Labels are the images' folder names (ImageFolder) unless --labels gives a CSV. The model folder can then be "
        "used with 'fastcbm salf explain --model OUT IMAGE'. Under torchrun the bottleneck trains data-parallel (one "
        "process per GPU; gloo on CPU).")
    p.add_argument("--cache", type=Path, required=True, help="training cache (fastcbm precompute ... --features NAME)")
    p.add_argument("--concepts", type=Path, required=True, help="concept list: text (one per line) or JSON class→list")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (config.json, model.safetensors, "
                   "train_report.json)")
    p.add_argument("--val-cache", type=Path, help="validation cache (same settings); default: hold out --val-fraction")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"held-out share when no --val-cache (default {d.val_fraction})")
    p.add_argument("--labels", type=Path, help="CSV/TSV 'path,class' for the training cache (default: folder names)")
    p.add_argument("--val-labels", type=Path, help="CSV/TSV labels for --val-cache (default: folder names)")
    p.add_argument("--template", action="append", help="concept text template, e.g. 'a photo of {}' (repeatable; "
                   "default '{}')")
    # every default below is read from TrainConfig (fastcbm.salf.train) or train_salf_from_cache: the CLI, the Python
    # API and `fastcbm demo` share one set of defaults
    p.add_argument("--class-sim-cutoff", type=_cutoff_arg, default=f.class_sim_cutoff,
                   help="drop concepts at least this similar to a class name (default auto: label-free CBM's 0.85, "
                   "or the CLIP's own calibration, fastcbm.concepts.MODEL_CUTOFFS; negative: off)")
    p.add_argument("--concept-sim-cutoff", type=_cutoff_arg, default=f.concept_sim_cutoff,
                   help="of two concepts at least this similar drop the one less similar to all others (default "
                   "auto: label-free CBM's 0.9, or the CLIP's own calibration; negative: off)")
    p.add_argument("--presence-cutoff", default=f.presence_cutoff, metavar="VALUE|PRESET",
                   help="drop concepts whose mean top-5 image similarity is at most this: a number or a label-free "
                   f"CBM preset ({', '.join(f'{k} {v}' for k, v in PRESENCE_CUTOFFS.items())}); default: off "
                   "(the presets are calibrated for real CLIP models)")
    p.add_argument("--max-concept-length", type=int, default=f.max_length,
                   help=f"characters (default {f.max_length}; 0: off)")
    p.add_argument("--batch-size", type=int, default=b.batch_size, help=f"bottleneck batch (default {b.batch_size:,})")
    p.add_argument("--steps", type=int, default=b.max_steps, help=f"maximum bottleneck steps (default {b.max_steps})")
    p.add_argument("--lr", type=float, default=b.lr, help=f"bottleneck Adam learning rate (default {b.lr})")
    p.add_argument("--bottleneck-stop", choices=("patience", "first"), default="patience",
                   help=f"'patience': stop after {b.patience} validation checks (every {b.eval_every} steps) without "
                   "improvement (default); 'first': label-free CBM's rule, stop at the first non-improvement, "
                   "checked every 50 steps")
    p.add_argument("--interpretability-cutoff", type=float, default=b.interpretability_cutoff,
                   help=f"drop concepts whose validation similarity is below (default {b.interpretability_cutoff})")
    p.add_argument("--pooling", choices=("mean", "softmax"), default=d.pooling, help="spatial pooling of the "
                   f"concept maps (default {d.pooling})")
    p.add_argument("--head", choices=("sparse", "dense"), default=d.fit.head,
                   help=f"final layer: sparse elastic net (GLM-SAGA path) or dense (default {d.fit.head})")
    p.add_argument("--alpha", type=float, default=d.fit.head_alpha,
                   help=f"elastic-net mixing of the sparse head (1 = lasso; default {d.fit.head_alpha})")
    p.add_argument("--lambdas", type=int, default=None, help="points on the sparse head's regularisation path "
                   "(default 30, warm-started)")
    p.add_argument("--head-epochs", type=int, default=None,
                   help="maximum passes per path point (sparse; default 2,000 full-batch or 100 SAGA epochs) or "
                   "L-BFGS iterations (dense)")
    p.add_argument("--target-nnz-per-class", type=float, default=d.fit.stop_nnz_per_class,
                   help="stop the sparse path once the non-zero weights per class pass this, as label-free CBM does "
                   f"(default {d.fit.stop_nnz_per_class}; 0: solve the whole path)")
    p.add_argument("--max-nnz-per-class", type=float, default=d.fit.max_nnz_per_class,
                   help="choose the best path point with at most this many weights per class (default: best val)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--verify", choices=("checksum", "size"), default=run_defaults["verify"],
                   help="how cache files are checked when first read: sha256 + NaN/inf once per file (checksum, "
                        "default) or sizes and headers only (size: skips one extra full read of a large cache)")
    p.add_argument("--device", default=run_defaults["device"], help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def _cutoff(value: float | str | None) -> float | str | None:
    return value if value is None or isinstance(value, str) else (None if value < 0 else value)


def _cutoff_arg(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def run_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fastcbm.concepts import presence_preset
    from fastcbm.salf.bottleneck import BottleneckConfig
    from fastcbm.salf.train import TrainConfig, train_salf_from_cache

    for flag, value in (("--cache", args.cache), ("--val-cache", args.val_cache)):
        if value is not None and not value.is_dir():
            raise MissingFile(f"{flag} {value} does not exist or is not a directory (run fastcbm precompute "
                              "first)")
    if not args.concepts.is_file():
        raise MissingFile(f"--concepts {args.concepts} does not exist")
    for flag, value, least in (("--batch-size", args.batch_size, 2), ("--steps", args.steps, 1),
                               ("--lambdas", args.lambdas, 1), ("--head-epochs", args.head_epochs, 1)):
        if value is not None and value < least:
            raise InvalidArgument(f"{flag} must be >= {least}, got {value}")
    if not 0 < args.val_fraction < 1:
        raise InvalidArgument(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not 0 <= args.alpha <= 1:
        raise InvalidArgument(f"--alpha must be in [0, 1], got {args.alpha}")
    for t in args.template or ():
        if t.count("{}") != 1:
            raise InvalidArgument(f"--template must contain exactly one '{{}}', got {t!r}")
    presence = args.presence_cutoff
    if isinstance(presence, str):
        try:
            presence = float(presence)
        except ValueError:
            presence = presence_preset(presence)  # a preset name, or one line naming the presets
    default = TrainConfig()
    head_options = {}
    if args.head == "sparse":
        if args.lambdas is not None:
            head_options["n_lambdas"] = args.lambdas
        if args.head_epochs is not None:
            head_options["max_epochs"] = args.head_epochs
    elif args.head_epochs is not None:
        head_options["epochs"] = args.head_epochs
    stop_first = args.bottleneck_stop == "first"
    config = replace(
        default, val_fraction=args.val_fraction, seed=args.seed, pooling=args.pooling,
        filter=replace(default.filter, max_length=args.max_concept_length or None,
                       class_sim_cutoff=_cutoff(args.class_sim_cutoff),
                       concept_sim_cutoff=_cutoff(args.concept_sim_cutoff), presence_cutoff=presence,
                       templates=tuple(args.template or ("{}",))),
        fit=replace(default.fit, bottleneck=replace(default.fit.bottleneck, lr=args.lr, batch_size=args.batch_size,
                                                    max_steps=args.steps,
                                                    eval_every=(BottleneckConfig.label_free_stop().eval_every
                                                                if stop_first else default.fit.bottleneck.eval_every),
                                                    patience=(BottleneckConfig.label_free_stop().patience
                                                              if stop_first else default.fit.bottleneck.patience),
                                                    interpretability_cutoff=args.interpretability_cutoff,
                                                    seed=args.seed),
                    head_alpha=args.alpha, max_nnz_per_class=args.max_nnz_per_class, head=args.head,
                    stop_nnz_per_class=(args.target_nnz_per_class or None), head_options=head_options),
    )
    _, report = train_salf_from_cache(args.cache, args.concepts, args.out, val_cache=args.val_cache,
                                      labels=args.labels, val_labels=args.val_labels, config=config,
                                      device=args.device, progress=not args.no_progress, overwrite=args.overwrite,
                                      verify=args.verify)
    summary = {k: report[k] for k in ("model", "images", "classes", "train_accuracy", "val_accuracy",
                                      "nonzero_weights_per_class", "seconds")}
    summary["concepts"] = {k: report["concepts"][k] for k in ("candidates", "after_filter", "kept")}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line
        print(json.dumps(summary, separators=(",", ":")))
    return 0


# ---- fastcbm salf evaluate (fastcbm.salf.evaluate) ------------------------------------------------------------------
def register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score a trained SALF-CBM: accuracy, per-class accuracy, confusion, sparsity, segmentation",
        description="Accuracy, per-class accuracy, confusion matrix and sparsity of a model written by 'fastcbm salf "
        "train' (or the demo) on a precompute cache (--cache, made with --features; no backbone pass) or a folder of "
        "images (--data; labels from folder names or --labels). With --masks, or on ImageNet-segmentation's "
        "gtsegs_ijcv.mat (--segmentation), also zero-shot segmentation of the class heatmaps against Grad-CAM on the "
        "same backbone (Chefer et al. protocol: pixel accuracy, mIoU, mAP). Prints JSON.")
    p.add_argument("--model", type=Path, required=True, help="model folder (config.json + model.safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cache", type=Path, help="precompute cache with the model's backbone features")
    src.add_argument("--data", type=Path, help="folder of images (ImageFolder: class = parent folder name)")
    src.add_argument("--segmentation", type=Path, metavar="GTSEGS_MAT",
                     help="ImageNet-segmentation's gtsegs_ijcv.mat: zero-shot segmentation only (no labels)")
    p.add_argument("--labels", type=Path, help="CSV/TSV 'path,class' instead of folder names (--cache / --data)")
    p.add_argument("--masks", type=Path, help="with --data: folder of foreground masks named like the images "
                   "(<stem>.png or .npy, non-zero = object)")
    p.add_argument("--limit", type=int, help="with --segmentation: only the first N images")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from fastcbm.files import atomic_write_text
    from fastcbm.models import load_backbone
    from fastcbm.salf import evaluate as ev
    from fastcbm.salf.model import SALFCBM, read_config

    if not args.model.is_dir():
        raise MissingFile(f"--model {args.model} does not exist")
    refuse_other_method(args.model, "salf", "evaluate")
    for flag in ("cache", "data", "segmentation", "labels", "masks"):
        value = getattr(args, flag)
        if value is not None and not value.exists():
            raise MissingFile(f"--{flag} {value} does not exist")
    if args.masks is not None and args.data is None:
        raise InvalidArgument("--masks goes with --data (masks named like the images)")
    positive(batch_size=args.batch_size, limit=args.limit)
    device = torch.device(args.device)
    progress = not args.no_progress
    config = read_config(args.model)
    if args.cache is not None:
        model = SALFCBM.load(args.model).to(device)
        result = ev.evaluate_cache(model, args.cache, args.labels, progress=progress)
    else:
        backbone = load_backbone(config.backbone, pretrained=config.backbone_pretrained, device=str(device))
        model = SALFCBM.load(args.model, backbone=backbone.model).to(device)
        if args.data is not None:
            result = ev.evaluate_images(model, backbone, args.data, args.labels, args.masks, args.batch_size, device,
                                        progress)
        else:
            result = ev.evaluate_segmentation(model, backbone, args.segmentation, args.batch_size, args.limit, device,
                                              progress)
    result = {"model": str(args.model), **result}
    text = json.dumps(result, indent=1)
    if args.out is not None:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


# ---- fastcbm salf explain (fastcbm.salf.explain, fastcbm.salf.bulk, fastcbm.deploy.serve) ----------------------------
def register_explain(sub: argparse._SubParsersAction) -> None:
    from fastcbm.salf.bulk import explain_folder

    d = signature_defaults(explain_folder)
    p = sub.add_parser(
        "explain", help="explain one image, or a whole folder, with a trained SALF-CBM (or an exported graph)",
        description="One image: prints its prediction, top concepts (and --region queries) as JSON. A folder (or a "
        "list file, with --out): writes maps.npy (class heatmaps, the format 'fastcbm metrics --maps' reads), "
        "contributions.npy, concepts.npy, concept_maps.npy, explanations.safetensors, predictions.json and one "
        "explanations.html page into --out. --engine serves the explanation from a graph written by 'fastcbm export'.")
    p.add_argument("image", type=Path, help="image file (any format PIL reads), or a folder / list file of images")
    p.add_argument("--model", type=Path, help="folder written by SALFCBM.save (e.g. the demo's model/)")
    p.add_argument("--engine", type=Path, help="serve the explanation from an exported graph instead: an .onnx or "
                   ".engine file from 'fastcbm export' (fastcbm.deploy)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"], default="auto",
                   help="with --engine: what runs it (auto: TensorRT, then onnxruntime)")
    p.add_argument("--top-k", type=int, default=d["top_k"], help=f"concepts listed per image (default {d['top_k']})")
    p.add_argument("--out", type=Path, help="output folder for a folder of images (arrays + one HTML page)")
    p.add_argument("--html-images", type=int, default=d["html_images"],
                   help=f"images shown on the folder's HTML page (default {d['html_images']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"images per forward pass for a folder (default {d['batch_size']})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--region", type=int, nargs="+", metavar="N",
                   help="Explain Anything: a point 'y x' or a box 'y0 x0 y1 x1' in image pixels")
    p.add_argument("--html", type=Path, help="also write an HTML report with the heatmaps")
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    if args.engine is not None:  # served from an exported graph: fastcbm.deploy owns this path
        from fastcbm.deploy.serve import run_explain_engine

        return run_explain_engine(args)
    if args.model is None:
        raise InvalidArgument("give --model DIR (a saved SALF-CBM) or --engine FILE (an exported graph)")
    from fastcbm.data.folder import IMAGE_EXTENSIONS
    from fastcbm.models import load_backbone
    from fastcbm.salf.model import SALFCBM, read_config

    positive(top_k=args.top_k)
    if not args.image.exists():
        raise MissingFile(f"image {args.image} does not exist")
    if not args.model.is_dir():
        raise MissingFile(f"--model {args.model} does not exist")
    refuse_other_method(args.model, "salf", "explain")
    bulk = args.image.is_dir() or args.image.suffix.lower() not in tuple(e.lower() for e in IMAGE_EXTENSIONS)
    if bulk and args.out is None:
        raise InvalidArgument(f"{args.image} is a folder or list of images: pass --out DIR for the arrays and HTML page")
    config = read_config(args.model)  # the backbone is built once, here, and handed to the model
    backbone = load_backbone(config.backbone, pretrained=config.backbone_pretrained)
    model = SALFCBM.load(args.model, backbone=backbone.model)
    if bulk:
        from fastcbm.salf.bulk import explain_folder

        if args.batch_size < 1 or args.html_images < 0:
            raise InvalidArgument(f"--batch-size must be >= 1 and --html-images >= 0, got {args.batch_size}, "
                                  f"{args.html_images}")
        summary = explain_folder(model, backbone, args.image, args.out, top_k=args.top_k, batch_size=args.batch_size,
                                 html_images=args.html_images, progress=not args.no_progress)
        print(json.dumps({k: v for k, v in summary.items() if k != "skipped"} | {"skipped": len(summary["skipped"])},
                         separators=(",", ":")))
        return 0
    print(json.dumps(_explain_one(args, model, backbone), indent=2))
    return 0


def _explain_one(args: argparse.Namespace, model, backbone) -> dict:
    """The JSON of one image: prediction, top concepts, ``--region`` scores; ``--html`` writes its page."""
    import torch

    from fastcbm.data.folder import BadImageError, decode_image
    from fastcbm.models.features import normalize_for_backbone
    from fastcbm.salf import explain as ex

    try:
        image = decode_image(args.image, int(backbone.input_size))
    except BadImageError as exc:
        raise InvalidArgument(f"image {args.image}: {exc}") from None
    x = normalize_for_backbone(image[None], backbone, torch.device("cpu"))
    (explanation,) = ex.explain(model, x, top_k=args.top_k)
    result = {
        "image": str(args.image),
        "predicted": explanation.class_name or explanation.predicted,
        "probability": round(float(explanation.probabilities[explanation.predicted]), 4),
        "top_concepts": [{"concept": n, "contribution": round(c, 4), "activation": round(a, 4)}
                         for n, c, a in explanation.top_concepts],
    }
    if args.region:
        if len(args.region) not in (2, 4):
            raise InvalidArgument(f"--region takes 2 (point) or 4 (box) numbers, got {len(args.region)}")
        result["region"] = [{"concept": n, "score": round(s, 4)}
                            for n, s in ex.explain_region(model, x, tuple(args.region), top_k=args.top_k)]
    if args.html:
        from fastcbm.salf.report import write_salf_report

        write_salf_report(args.html, images=image[None], explanations=[explanation],
                          rules=ex.decision_rules(model), summary={"image": str(args.image)},
                          class_names=model.config.class_names)
        result["html"] = str(args.html)
    return result


# ---- fastcbm salf demo (fastcbm.salf.demo; also `fastcbm demo`) -----------------------------------------------------
DEMO_HELP = "SALF-CBM end to end on the synthetic testbed: precompute, train, evaluate, HTML report"
DEMO_DESCRIPTION = ("Generates testbed scenes, precomputes ring-prompt embeddings with the bundled tiny CLIP, trains "
                    "the concept bottleneck and sparse head on the bundled tiny CNN (with 'fastcbm salf train''s "
                    "defaults), evaluates accuracy and zero-shot segmentation (vs Grad-CAM), writes an HTML report "
                    "and prints one JSON summary line.")
MIN_SCENES = 10


def register_demo(sub: argparse._SubParsersAction) -> None:
    add_demo_options(sub.add_parser("demo", help=DEMO_HELP, description=DEMO_DESCRIPTION))


def add_demo_options(p: argparse.ArgumentParser) -> None:
    """The SALF demo's options, each a field of :class:`fastcbm.salf.demo.DemoConfig` (also ``fastcbm demo``'s)."""
    from fastcbm.prompts import MAX_GRID
    from fastcbm.salf.demo import DemoConfig

    d = DemoConfig()
    config_option(p, d, "out", "output folder")
    for name, what in (("n_train", "training"), ("n_val", "validation"), ("n_test", "test")):
        config_option(p, d, name, f"{what} scenes, at least {MIN_SCENES}")
    config_option(p, d, "grid", f"prompt grid: G×G rings, G from 1 to {MAX_GRID}")
    config_option(p, d, "seed", "seed of the generated scenes and training")
    config_option(p, d, "device", "torch device")
    config_option(p, d, "progress", "no progress bars")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from fastcbm.salf.demo import DemoConfig
    from fastcbm.salf.demo import run_demo as run

    for name in ("n_train", "n_val", "n_test"):
        if getattr(args, name) < MIN_SCENES:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be >= {MIN_SCENES}, got {getattr(args, name)}")
    print(json.dumps(run(config_from_args(DemoConfig(), args)), separators=(",", ":")))
    return 0
