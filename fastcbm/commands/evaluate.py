"""``fastcbm evaluate --method salf --model DIR --cache CACHE | --data DIR [--masks DIR] | --segmentation FILE``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastcbm.errors import InvalidArgument, MissingFile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a trained SALF-CBM: accuracy, per-class accuracy, confusion, sparsity, segmentation",
        description="Accuracy, per-class accuracy, confusion matrix and sparsity of a model written by 'fastcbm train' "
        "(or the demo) on a precompute cache (--cache, made with --features; no backbone pass) or a folder of "
        "images (--data; labels from folder names or --labels). With --masks, or on ImageNet-segmentation's "
        "gtsegs_ijcv.mat (--segmentation), also zero-shot segmentation of the class heatmaps against Grad-CAM on the "
        "same backbone (Chefer et al. protocol: pixel accuracy, mIoU, mAP). Prints JSON.")
    p.add_argument("--method", choices=["salf"], default="salf", help="model type (default salf)")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from fastcbm.models import load_backbone
    from fastcbm.salf import evaluate as ev
    from fastcbm.salf.model import SALFCBM, read_config

    if not args.model.is_dir():
        raise MissingFile(f"--model {args.model} does not exist")
    for flag in ("cache", "data", "segmentation", "labels", "masks"):
        value = getattr(args, flag)
        if value is not None and not value.exists():
            raise MissingFile(f"--{flag} {value} does not exist")
    if args.masks is not None and args.data is None:
        raise InvalidArgument("--masks goes with --data (masks named like the images)")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise InvalidArgument(f"--batch-size and --limit must be >= 1, got {args.batch_size}, {args.limit}")
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
        args.out.write_text(text + "\n")
    print(text)
    return 0
