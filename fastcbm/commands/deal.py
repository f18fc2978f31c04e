"""``fastcbm deal <sub-command>``: DEAL (disentangle and localize concept-level explanations of a CLIP).

``fastcbm deal train --data DIR --concepts concepts.json --model testbed|ViT-B-32 [--pretrained TAG] --out DIR``
fine-tunes a CLIP; the output folder loads back with ``load_clip(DIR)`` / ``--model DIR`` everywhere. Sub-commands
register in ``register`` below (each a function adding its parser to ``deal``'s sub-parsers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deal", help="DEAL: fine-tune CLIP so concept explanations are disentangled and localized",
        description="DEAL fine-tunes a CLIP with a contrastive loss on concept-augmented captions plus regularisers "
                    "on differentiable concept explanations (separation between concepts, consistency with the "
                    "category). Start with 'fastcbm deal train --data DIR --concepts concepts.json --out DIR'.")
    sub = p.add_subparsers(dest="deal_command", metavar="<sub-command>")
    p.set_defaults(func=lambda args: _no_subcommand(p))
    register_train(sub)


def _no_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


# DealConfig's defaults, repeated here so building the parser imports no torch (a test keeps them equal)
DEFAULTS = argparse.Namespace(k=5, epochs=1, batch_size=32, lr=5e-7, weight_decay=1e-3, lambda_sep=0.1,
                              lambda_con=0.01, lambda_spa=5e-4, caption_form="code", loss_form="code",
                              mode="batched", seed=0, checkpoint_every=100)


def register_train(sub: argparse._SubParsersAction) -> None:
    d = DEFAULTS
    t = sub.add_parser(
        "train", help="fine-tune a CLIP with DEAL (or --plain contrastive fine-tuning, the baseline)",
        description="Fine-tunes a CLIP with DEAL's objective: symmetric InfoNCE on '{class}. It may contain c1, ..., "
                    "cK' captions + λ_sep·separation + λ_con·consistency + λ_spa·sparsity of the concept "
                    "explanations, whose gradients reach the image tower (the authors' released code detaches "
                    "them). Defaults are the published settings. A checkpoint is written every "
                    "--checkpoint-every steps: rerun the same command to resume.")
    t.add_argument("--data", type=Path, required=True,
                   help="ImageFolder directory DIR/<class>/<image> (a 'fastcbm testbed export' folder works too)")
    t.add_argument("--concepts", type=Path, required=True,
                   help="JSON {class: [descriptors]} (the authors' format; folder names match with '_' as a space)")
    t.add_argument("--model", default="testbed",
                   help="CLIP to fine-tune: 'testbed', an open_clip name such as ViT-B-32, or a DEAL output folder")
    t.add_argument("--pretrained", default=None, help="open_clip pretrained tag (default: none = random init)")
    t.add_argument("--out", type=Path, required=True,
                   help="output folder (config.json, weights.safetensors, train_report.json, checkpoint/)")
    t.add_argument("--k", type=int, default=d.k, help=f"descriptors per class (default {d.k})")
    t.add_argument("--steps", type=int, default=None, help="optimiser steps (default: --epochs passes)")
    t.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    t.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    t.add_argument("--lambda-sep", type=float, default=d.lambda_sep, help=f"default {d.lambda_sep}")
    t.add_argument("--lambda-con", type=float, default=d.lambda_con, help=f"default {d.lambda_con}")
    t.add_argument("--lambda-spa", type=float, default=d.lambda_spa, help=f"default {d.lambda_spa}")
    t.add_argument("--caption-form", choices=("code", "paper"), default=d.caption_form,
                   help="'code': '{class}. It may contain c1, ..., cK' (released code, default); 'paper': "
                        "'An image of {class} with c1, ..., and cK'")
    t.add_argument("--loss-form", choices=("code", "paper"), default=d.loss_form,
                   help="'code': products / squared sums as the released code (default); 'paper': L1 distances")
    t.add_argument("--plain", action="store_true",
                   help="baseline: same steps, data order and captions, regularisers off")
    t.add_argument("--mode", choices=("batched", "expand", "loop"), default=d.mode,
                   help="how the K+1 explanation gradients are batched (default batched)")
    t.add_argument("--seed", type=int, default=d.seed, help="data order seed")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"steps between checkpoints (default {d.checkpoint_every}; 0: only at the end)")
    t.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA (CPU never uses it)")
    t.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from fastcbm.deal.train import DealConfig, train_deal
    from fastcbm.distributed import resolve_device

    if not args.data.exists():
        raise FileNotFoundError(f"--data: {args.data} does not exist")
    if not args.concepts.is_file():
        raise FileNotFoundError(f"--concepts: {args.concepts} does not exist or is not a file")
    cfg = DealConfig(lr=args.lr, weight_decay=args.weight_decay, lambda_sep=args.lambda_sep,
                     lambda_con=args.lambda_con, lambda_spa=args.lambda_spa, k=args.k,
                     caption_form=args.caption_form, loss_form=args.loss_form, batch_size=args.batch_size,
                     steps=args.steps, epochs=args.epochs, seed=args.seed, plain=args.plain, mode=args.mode,
                     amp=not args.no_amp, checkpoint_every=args.checkpoint_every)
    report = train_deal(args.data, args.concepts, args.model, cfg, args.out, pretrained=args.pretrained,
                        resume=not args.no_resume, progress=not args.no_progress,
                        device=resolve_device(args.device))
    final = report["final"] or {}
    print(json.dumps({"model": str(args.out), "base_model": report["base_model"], "steps": report["steps"],
                      "resumed_from": report["resumed_from"], "plain": cfg.plain,
                      "final": {k: v for k, v in final.items() if k != "step"},
                      "seconds_per_step": report["seconds_per_step"]}))
    return 0
