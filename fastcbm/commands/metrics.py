"""``fastcbm metrics``: NRA, EPG and hit rate of saved saliency maps against saved masks."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("metrics", help="evaluate saliency maps against masks (NRA, EPG, hit rate)")
    p.add_argument("--maps", required=True, type=Path, help="float maps [N, h, w] (.npy, .npz or .pt)")
    p.add_argument("--masks", required=True, type=Path, help="masks [N, H, W]: bool, or 0/1 integers (.npy/.npz/.pt)")
    p.add_argument("--variant", choices=("official", "paper"), default="official", help="NRA variant (default official)")
    p.add_argument("--threshold", type=float, default=0.5, help="hit-rate threshold on NRA (default 0.5)")
    p.add_argument("--backend", default="auto", help="auto, reference, cpu, triton or cuda")
    p.add_argument("--device", default="cpu", help="torch device to evaluate on (default cpu)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--out", type=Path, help="write per-sample index,nra,epg to this CSV file")
    p.set_defaults(func=run)


def load_array(path: Path, what: str):
    """One array from .npy / .npz (a single array, or the key named ``what``) / .pt (a tensor or a one-tensor dict).
    Anything else — strings, complex or object arrays, a text file named .npy, a garbage .pt — is a one-line
    ValueError naming the file."""
    import numpy as np
    import torch

    if path.is_dir():
        raise InvalidFile(f"--{what}: {path} is a directory, not a .npy/.npz/.pt file")
    if not path.is_file():
        raise MissingFile(f"--{what}: no such file: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".pt"):
        raise InvalidArgument(f"--{what}: unsupported file type {suffix!r} (use .npy, .npz or .pt)")
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                key = what if what in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise InvalidFile(f"--{what}: {path} holds arrays {keys}; name one {what!r} or keep just one")
                arr = z[key]
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = obj.get(what, next(iter(obj.values())) if len(obj) == 1 else None)
            if not isinstance(obj, torch.Tensor):
                raise InvalidFile(f"--{what}: {path} must hold a tensor (or a dict with one tensor or key {what!r})")
            if obj.is_complex() or obj.is_quantized:
                raise InvalidFile(f"--{what}: {path} holds {obj.dtype} values; expected real numbers or bools")
            return obj
    except ValueError as exc:
        if str(exc).startswith(f"--{what}"):
            raise
        raise InvalidFile(f"--{what}: could not read {path} as {suffix} ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - pickle/zip/torch errors on hostile files: one line, not a traceback
        raise InvalidFile(f"--{what}: could not read {path} as {suffix} ({type(exc).__name__}: {_first_line(exc)})"
                          ) from None
    if arr.dtype.kind not in "biuf":  # strings (U/S), complex (c), objects (O), datetimes, structured (V)
        raise InvalidFile(f"--{what}: {path} holds {arr.dtype} values ({_KINDS.get(arr.dtype.kind, 'not numbers')}); "
                          "expected real numbers or bools")
    return torch.from_numpy(np.ascontiguousarray(arr.astype(np.float32) if arr.dtype == np.float16 else arr))


_KINDS = {"U": "strings", "S": "byte strings", "c": "complex numbers", "O": "Python objects", "V": "records",
          "M": "dates", "m": "time deltas"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def to_masks(masks):
    """bool masks as-is; 0/1 integer or float masks converted; anything else is an error."""
    import torch

    if masks.dtype == torch.bool:
        return masks
    if masks.is_complex() or not bool(((masks == 0) | (masks == 1)).all()):
        raise InvalidArgument(f"--masks must be bool or 0/1 values, got dtype {masks.dtype} with other values")
    return masks != 0


def run(args: argparse.Namespace) -> int:
    import torch

    from fastcbm.metrics import epg, hit_rate, nra

    if not math.isfinite(args.threshold):
        raise InvalidArgument(f"--threshold must be a finite number, got {args.threshold}")
    if args.out is not None:  # checked before any work: a bad --out must not cost the evaluation
        from fastcbm.files import check_output_file

        check_output_file(args.out, "--out")
    maps = load_array(args.maps, "maps")
    masks = to_masks(load_array(args.masks, "masks"))
    if not maps.is_floating_point():
        maps = maps.to(torch.float32)  # integer maps (e.g. uint8 heatmaps) are ranked by value
    bad = ~torch.isfinite(maps.reshape(maps.shape[0], -1)).all(dim=1) if maps.dim() >= 1 and maps.numel() else None
    if bad is not None and bool(bad.any()):
        raise InvalidArgument(f"--maps: {args.maps} has NaN/inf values in {int(bad.sum())} map(s), first at index "
                              f"{int(bad.nonzero()[0])}")
    device = torch.device(args.device)
    maps, masks = maps.to(device), masks.to(device)
    nra_values = nra(maps, masks, variant=args.variant, backend=args.backend)
    epg_values = epg(maps, masks, backend=args.backend)
    summary = {
        "samples": int(nra_values.numel()),
        "variant": args.variant,
        "nra": float(nra_values.mean()),
        "epg": float(epg_values.mean()),
        "hit_rate": hit_rate(nra_values, args.threshold),
        "threshold": args.threshold,
    }
    if args.out is not None:
        with open(args.out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "nra", "epg"])
            for i, (a, b) in enumerate(zip(nra_values.tolist(), epg_values.tolist())):
                writer.writerow([i, f"{a:.10g}", f"{b:.10g}"])
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"samples   {summary['samples']}")
        print(f"NRA ({args.variant}) {summary['nra']:.6f}")
        print(f"EPG       {summary['epg']:.6f}")
        print(f"hit rate  {summary['hit_rate']:.6f}  (NRA > {args.threshold})")
    return 0
