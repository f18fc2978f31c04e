"""``fastcbm train --method salf --cache CACHE --concepts FILE --out MODEL``: train on your own images."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a SALF-CBM on your images from a precompute cache (made with --features)",
        description="Trains the concept bottleneck (fused cubic-cosine loss, batches streamed from the cache) and the "
        "sparse head on a cache written by 'fastcbm precompute --data DIR --model CLIP --features BACKBONE'. "
        "Labels are the images' folder names (ImageFolder) unless --labels gives a CSV. The model folder can then be "
        "used with 'fastcbm explain --model OUT IMAGE'. Under torchrun the bottleneck trains data-parallel (one "
        "process per GPU; gloo on CPU).")
    p.add_argument("--method", choices=["salf"], default="salf")
    p.add_argument("--cache", type=Path, required=True, help="training cache (fastcbm precompute ... --features NAME)")
    p.add_argument("--concepts", type=Path, required=True, help="concept list: text (one per line) or JSON class→list")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (config.json, model.safetensors, "
                   "train_report.json)")
    p.add_argument("--val-cache", type=Path, help="validation cache (same settings); default: hold out --val-fraction")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share when no --val-cache (default 0.1)")
    p.add_argument("--labels", type=Path, help="CSV/TSV 'path,class' for the training cache (default: folder names)")
    p.add_argument("--val-labels", type=Path, help="CSV/TSV labels for --val-cache (default: folder names)")
    p.add_argument("--template", action="append", help="concept text template, e.g. 'a photo of {}' (repeatable; "
                   "default '{}')")
    p.add_argument("--class-sim-cutoff", type=float, default=0.85,
                   help="drop concepts this similar to a class name (default 0.85; negative: off)")
    p.add_argument("--concept-sim-cutoff", type=float, default=0.9,
                   help="drop the later of two concepts this similar (default 0.9; negative: off)")
    p.add_argument("--presence-cutoff", type=float, default=None,
                   help="drop concepts whose mean top-5 image similarity is below this (default: off)")
    p.add_argument("--max-concept-length", type=int, default=30, help="characters (default 30; 0: off)")
    p.add_argument("--batch-size", type=int, default=50_000, help="bottleneck batch (default 50,000)")
    p.add_argument("--steps", type=int, default=1000, help="maximum bottleneck steps (default 1000)")
    p.add_argument("--lr", type=float, default=1e-3, help="bottleneck Adam learning rate (default 1e-3)")
    p.add_argument("--interpretability-cutoff", type=float, default=0.45,
                   help="drop concepts whose validation similarity is below (default 0.45)")
    p.add_argument("--pooling", choices=("mean", "softmax"), default="mean")
    p.add_argument("--head", choices=("sparse", "dense"), default="sparse")
    p.add_argument("--alpha", type=float, default=0.99, help="elastic-net mixing of the sparse head (1 = lasso)")
    p.add_argument("--lambdas", type=int, default=100, help="points on the sparse head's regularisation path "
                   "(default 100, as GLM-SAGA)")
    p.add_argument("--head-epochs", type=int, default=100,
                   help="maximum epochs per path point (sparse) or L-BFGS iterations (dense); default 100")
    p.add_argument("--max-nnz-per-class", type=float, default=None,
                   help="choose the densest path point with at most this many weights per class (default: best val)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _cutoff(value: float | None) -> float | None:
    return None if value is None or value < 0 else value


def run(args: argparse.Namespace) -> int:
    from fastcbm.salf.bottleneck import BottleneckConfig
    from fastcbm.salf.pipeline import SALFFitConfig
    from fastcbm.salf.train import ConceptFilterConfig, TrainConfig, train_salf_from_cache

    for flag, value in (("--cache", args.cache), ("--val-cache", args.val_cache)):
        if value is not None and not value.is_dir():
            raise FileNotFoundError(f"{flag} {value} is not a directory (run fastcbm precompute first)")
    if not args.concepts.is_file():
        raise FileNotFoundError(f"--concepts {args.concepts} not found")
    for flag, value, least in (("--batch-size", args.batch_size, 2), ("--steps", args.steps, 1),
                               ("--lambdas", args.lambdas, 1), ("--head-epochs", args.head_epochs, 1)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    for t in args.template or ():
        if t.count("{}") != 1:
            raise ValueError(f"--template must contain exactly one '{{}}', got {t!r}")
    config = TrainConfig(
        val_fraction=args.val_fraction, seed=args.seed, pooling=args.pooling,
        filter=ConceptFilterConfig(max_length=args.max_concept_length or None,
                                   class_sim_cutoff=_cutoff(args.class_sim_cutoff),
                                   concept_sim_cutoff=_cutoff(args.concept_sim_cutoff),
                                   presence_cutoff=args.presence_cutoff,
                                   templates=tuple(args.template or ("{}",))),
        fit=SALFFitConfig(bottleneck=BottleneckConfig(lr=args.lr, batch_size=args.batch_size, max_steps=args.steps,
                                                      interpretability_cutoff=args.interpretability_cutoff,
                                                      seed=args.seed),
                          head_alpha=args.alpha, max_nnz_per_class=args.max_nnz_per_class, head=args.head,
                          head_options=({"n_lambdas": args.lambdas, "max_epochs": args.head_epochs}
                                        if args.head == "sparse" else {"epochs": args.head_epochs})),
    )
    _, report = train_salf_from_cache(args.cache, args.concepts, args.out, val_cache=args.val_cache,
                                      labels=args.labels, val_labels=args.val_labels, config=config,
                                      device=args.device, progress=not args.no_progress, overwrite=args.overwrite)
    summary = {k: report[k] for k in ("model", "images", "classes", "train_accuracy", "val_accuracy",
                                      "nonzero_weights_per_class", "seconds")}
    summary["concepts"] = {k: report["concepts"][k] for k in ("candidates", "after_filter", "kept")}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line
        print(json.dumps(summary, separators=(",", ":")))
    return 0
