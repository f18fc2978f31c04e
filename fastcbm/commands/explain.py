"""``fastcbm explain --method salf --model DIR IMAGE``: explain one image with a trained model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastcbm.errors import InvalidArgument, MissingFile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain", help="explain one image, or a whole folder, with a trained concept model",
        description="One image: prints its prediction, top concepts (and --region queries) as JSON. A folder (or a "
        "list file, with --out): writes maps.npy (class heatmaps, the format 'fastcbm metrics --maps' reads), "
        "contributions.npy, concepts.npy, concept_maps.npy, explanations.safetensors, predictions.json and one "
        "explanations.html page into --out.")
    p.add_argument("image", type=Path, help="image file (any format PIL reads), or a folder / list file of images")
    p.add_argument("--method", choices=["salf", "cefam"], default="salf", help="model type (default salf)")
    p.add_argument("--model", type=Path, help="folder written by SALFCBM.save (e.g. the demo's model/)")
    p.add_argument("--engine", type=Path, help="serve the explanation from an exported graph instead: an .onnx or "
                   ".engine file from 'fastcbm export' (fastcbm.deploy)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"], default="auto",
                   help="with --engine: what runs it (auto: TensorRT, then onnxruntime)")
    p.add_argument("--top-k", type=int, default=5, help="concepts listed per image (default 5)")
    p.add_argument("--out", type=Path, help="output folder for a folder of images (arrays + one HTML page)")
    p.add_argument("--html-images", type=int, default=24, help="images shown on the folder's HTML page (default 24)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass for a folder (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--region", type=int, nargs="+", metavar="N",
                   help="Explain Anything: a point 'y x' or a box 'y0 x0 y1 x1' in image pixels")
    p.add_argument("--html", type=Path, help="also write an HTML report with the heatmaps")
    p.add_argument("--concepts", type=Path, help="cefam: concept list, one per line (default: the testbed vocabulary "
                   "for a testbed classifier)")
    p.add_argument("--template", action="append", help="cefam: text template for --concepts, e.g. 'a photo of a {}'")
    p.add_argument("--png", type=Path, help="cefam: also write a PNG strip (the image, then each concept's region)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "engine", None) is not None:  # served from an exported graph: fastcbm.deploy owns this path
        from fastcbm.deploy.serve import run_explain_engine

        return run_explain_engine(args)
    if args.method == "cefam":  # CE-FAM: fastcbm.cefam.explain owns this path
        from fastcbm.commands.cefam_eval import run_explain as run_cefam

        return run_cefam(args)
    if args.model is None:
        raise InvalidArgument("give --model DIR (a saved SALF-CBM) or --engine FILE (an exported graph)")
    import torch

    from fastcbm.data.folder import BadImageError, decode_image
    from fastcbm.salf import explain as ex
    from fastcbm.salf.model import SALFCBM
    from fastcbm.models.features import normalize_for_backbone

    if args.top_k < 1:
        raise InvalidArgument(f"--top-k must be >= 1, got {args.top_k}")
    if not args.image.exists():
        raise MissingFile(f"image {args.image} does not exist")
    if not args.model.is_dir():
        raise MissingFile(f"--model {args.model} does not exist")
    from fastcbm.data.folder import IMAGE_EXTENSIONS
    from fastcbm.models import load_backbone
    from fastcbm.salf.model import read_config

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
    print(json.dumps(result, indent=2))
    return 0
