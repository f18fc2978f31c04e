"""``fastcbm train --method salf --cache CACHE --concepts FILE --out MODEL``: train on your own images."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fastcbm.errors import InvalidArgument, MissingFile


def register(subparsers: argparse._SubParsersAction) -> None:
    from fastcbm.concepts import PRESENCE_CUTOFFS
    from fastcbm.salf.train import TrainConfig

    d = TrainConfig()
    f, b = d.filter, d.fit.bottleneck
    p = subparsers.add_parser(
        "train", help="train a SALF-CBM on your images from a precompute cache (made with --features)",
        description="Trains the concept bottleneck (fused cubic-cosine loss, batches streamed from the cache) and the "
        "sparse head on a cache written by 'fastcbm precompute --data DIR --model CLIP --features BACKBONE'. "
        "Labels are the images' folder names (ImageFolder) unless --labels gives a CSV. The model folder can then be "
        "used with 'fastcbm explain --model OUT IMAGE'. Under torchrun the bottleneck trains data-parallel (one "
        "process per GPU; gloo on CPU).")
    p.add_argument("--method", choices=["salf"], default="salf", help="method (default salf)")
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
    # every default below is read from TrainConfig (fastcbm.salf.train): the CLI, the Python API and `fastcbm demo`
    # share one set of defaults
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
    p.add_argument("--verify", choices=("checksum", "size"), default="checksum",
                   help="how cache files are checked when first read: sha256 + NaN/inf once per file (checksum, "
                        "default) or sizes and headers only (size: skips one extra full read of a large cache)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _cutoff(value: float | str | None) -> float | str | None:
    return value if value is None or isinstance(value, str) else (None if value < 0 else value)


def _cutoff_arg(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
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
