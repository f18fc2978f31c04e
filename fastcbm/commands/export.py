"""``fastcbm export``: a saved SALF-CBM (or a CLIP image tower) → an ONNX graph or a TensorRT engine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastcbm.errors import InvalidArgument, MissingFile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a trained SALF-CBM (or a CLIP image tower) to ONNX or TensorRT",
        description="Write ONE graph that predicts and explains: raw pixels [N,3,S,S] → logits [N,K], concepts [N,M], "
                    "concept_maps [N,M,Gy,Gx], contributions [N,M] (predicted class), with dynamic batch and the "
                    "normalisation inside. --model exports a CLIP image tower instead (images → embedding [N,D]). "
                    "Run it with fastcbm.deploy.load(FILE) or 'fastcbm salf explain --engine FILE IMAGE'.")
    p.add_argument("model_dir", nargs="?", type=Path, help="folder written by SALFCBM.save (e.g. the demo's model/)")
    p.add_argument("--model", default=None, metavar="CLIP",
                   help="export this CLIP model's image tower instead (testbed, ViT-B-16, ...)")
    p.add_argument("--pretrained", default=None, help="CLIP pretrained tag (with --model; default random init)")
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx",
                   help="onnx (default), or a TensorRT engine built from the ONNX graph (needs TensorRT and a GPU)")
    p.add_argument("--out", type=Path, required=True, help="output file (.onnx, or .engine for TensorRT)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: a reduced-precision graph (TensorRT builds it as a strongly typed fp16 engine)")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch (TensorRT profile 1..N; default 64)")
    p.add_argument("--opt-batch", type=int, default=None,
                   help="TensorRT: the batch its kernels are tuned for (default min(8, max batch))")
    p.add_argument("--input-dtype", choices=("uint8", "float32", "normalized"), default=None,
                   help="input pixels: uint8 0-255 (SALF-CBM default), float32 0-1, or normalized floats "
                        "(CLIP default: what precompute feeds)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 default; >= 18 uses the dynamo exporter)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastcbm.deploy import export_clip_onnx, export_onnx
    from fastcbm.deploy.tensorrt import (
        TensorRTUnavailableError,
        build_engine,
        import_tensorrt,
    )

    if (args.model_dir is None) == (args.model is None):
        raise InvalidArgument("give either MODEL_DIR (a saved SALF-CBM) or --model CLIP (an image tower), not both/none")
    if args.max_batch < 1:
        raise InvalidArgument(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.model_dir is not None and not args.model_dir.is_dir():
        raise MissingFile(f"MODEL_DIR {args.model_dir} is not a folder (expected one written by SALFCBM.save)")
    if args.format == "tensorrt":
        try:
            import_tensorrt()  # before spending minutes on an export that cannot be built
        except TensorRTUnavailableError as exc:
            print(f"fastcbm export: error: {exc}", file=sys.stderr)
            return 2
    onnx_path = args.out if args.format == "onnx" else args.out.with_suffix(".onnx")
    kw = {"precision": args.precision, "max_batch": args.max_batch, "opset": args.opset}
    if args.model is not None:
        export_clip_onnx(args.model, onnx_path, pretrained=args.pretrained,
                         input_dtype=args.input_dtype or "normalized", **kw)
    else:
        export_onnx(args.model_dir, onnx_path, input_dtype=args.input_dtype or "uint8", **kw)
    result = {"onnx": str(onnx_path)}
    if args.format == "tensorrt":
        try:
            result["engine"] = str(build_engine(onnx_path, args.out, max_batch=args.max_batch,
                                                opt_batch=args.opt_batch))
        except TensorRTUnavailableError as exc:
            print(f"fastcbm export: error: {exc}", file=sys.stderr)
            return 2
    print(json.dumps(result))
    return 0
