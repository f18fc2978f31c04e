"""``fastcbm demo``: train and explain a SALF-CBM on the synthetic testbed (the README's main command)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastcbm.errors import InvalidArgument


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="SALF-CBM end to end on the synthetic testbed: precompute, train, evaluate, HTML report",
        description="Generates testbed scenes, precomputes ring-prompt embeddings with the bundled tiny CLIP, trains "
        "the concept bottleneck and sparse head on the bundled tiny CNN, evaluates accuracy and zero-shot "
        "segmentation (vs Grad-CAM), writes an HTML report and prints one JSON summary line.",
    )
    p.add_argument("--out", type=Path, default=Path("fastcbm_out/demo"), help="output folder (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=600, help="training scenes (default %(default)s, at least 10)")
    p.add_argument("--n-val", type=int, default=150, help="validation scenes (default %(default)s, at least 10)")
    p.add_argument("--n-test", type=int, default=150, help="test scenes (default %(default)s, at least 10)")
    p.add_argument("--grid", type=int, default=7, help="prompt grid: G×G rings, G from 1 to 32 (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated scenes and training (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--method", choices=("salf", "deal", "cefam"), default="salf",
                   help="salf (default): the SALF-CBM demo; deal: DEAL vs plain fine-tuning of the testbed CLIP, "
                        "metrics before/after and an HTML page of concept maps (fastcbm.deal.demo); cefam: CE-FAM translator on "
                        "the bundled CNN (or --classifier testbed-vit), regions vs the scenes' concept masks against "
                        "CLIP-Dissect (fastcbm.cefam.demo)")
    # = fastcbm.cefam.demo.DEMO_CLASSIFIERS (spelled out: importing it here would load torch for every command)
    p.add_argument("--classifier", choices=("testbed", "testbed-vit"), default="testbed",
                   help="--method cefam: the classifier explained, the bundled CNN (default; four stages, the "
                        "association picks one per concept) or the bundled ViT (its last block's tokens, one stage)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "method", "salf") == "deal":
        from fastcbm.deal.demo import run_from_args

        return run_from_args(args)
    if getattr(args, "method", "salf") == "cefam":
        from fastcbm.commands.cefam_eval import run_demo as run_cefam_demo

        return run_cefam_demo(args)
    from fastcbm.salf.demo import DemoConfig, run_demo

    for name in ("n_train", "n_val", "n_test"):
        if getattr(args, name) < 10:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be >= 10, got {getattr(args, name)}")
    summary = run_demo(DemoConfig(out=args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                                  grid=args.grid, seed=args.seed, device=args.device,
                                  progress=not args.no_progress))
    print(json.dumps(summary, separators=(",", ":")))
    return 0
