"""``fastcbm deal <sub-command>``: DEAL (disentangle and localize concept-level explanations of a CLIP).

``fastcbm deal train --data DIR --concepts concepts.json --model testbed|ViT-B-32 [--pretrained TAG] --out DIR``
fine-tunes a CLIP; the output folder loads back with ``load_clip(DIR)`` / ``--model DIR`` everywhere. Sub-commands
register in ``register`` below (each a function adding its parser to ``deal``'s sub-parsers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastcbm.commands import help_without_subcommand
from fastcbm.errors import InvalidArgument, MissingFile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deal", help="DEAL: fine-tune CLIP so concept explanations are disentangled and localized",
        description="DEAL fine-tunes a CLIP with a contrastive loss on concept-augmented captions plus regularisers "
                    "on differentiable concept explanations (separation between concepts, consistency with the "
                    "category). Start with 'fastcbm deal train --data DIR --concepts concepts.json --out DIR'.")
    sub = p.add_subparsers(dest="deal_command", metavar="<sub-command>")
    help_without_subcommand(p)
    register_train(sub)
    register_evaluate(sub)


# DealConfig's defaults, repeated here so building the parser imports no torch (a test keeps them equal)
DEFAULTS = argparse.Namespace(k=5, epochs=1, batch_size=32, lr=5e-7, weight_decay=1e-3, lambda_sep=0.1,
                              lambda_con=0.01, lambda_spa=5e-4, caption_form="code", loss_form="code",
                              mode="auto", seed=0, checkpoint_every=100)


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
    t.add_argument("--mode", choices=("auto", "fast", "batched", "expand", "loop"), default=d.mode,
                   help="how the K+1 explanation gradients are computed (default auto: the closed-form / CLS-only "
                        "fast path where it applies)")
    t.add_argument("--seed", type=int, default=d.seed, help="data order seed")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"steps between checkpoints (default {d.checkpoint_every}; 0: only at the end)")
    t.add_argument("--explain-text-grad", action="store_true",
                   help="also send the regularisers' gradient into the text tower through the K+1 explained texts "
                        "(default: those texts are encoded without gradient, so the regularisers train the image "
                        "tower only; 2.5x the cost of a plain step on a ViT-B/32-shaped model instead of 1.5x)")
    t.add_argument("--explain-layer", choices=("layer4", "layer3"), default="layer4",
                   help="ResNet towers: the stage Grad-CAM explains (default layer4, as published; layer3: a 2x finer "
                        "grid, gradients through layer4). ViT towers: always the last block")
    t.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA (CPU never uses it)")
    t.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from fastcbm.deal.train import DealConfig, train_deal
    from fastcbm.distributed import resolve_device

    if not args.data.exists():
        raise MissingFile(f"--data: {args.data} does not exist")
    if not args.concepts.is_file():
        raise MissingFile(f"--concepts: {args.concepts} does not exist or is not a file")
    cfg = DealConfig(lr=args.lr, weight_decay=args.weight_decay, lambda_sep=args.lambda_sep,
                     lambda_con=args.lambda_con, lambda_spa=args.lambda_spa, k=args.k,
                     caption_form=args.caption_form, loss_form=args.loss_form, batch_size=args.batch_size,
                     steps=args.steps, epochs=args.epochs, seed=args.seed, plain=args.plain, mode=args.mode,
                     amp=not args.no_amp, checkpoint_every=args.checkpoint_every,
                     explain_text_grad=args.explain_text_grad, explain_layer=args.explain_layer)
    report = train_deal(args.data, args.concepts, args.model, cfg, args.out, pretrained=args.pretrained,
                        resume=not args.no_resume, progress=not args.no_progress,
                        device=resolve_device(args.device))
    final = report["final"] or {}
    print(json.dumps({"model": str(args.out), "base_model": report["base_model"], "steps": report["steps"],
                      "resumed_from": report["resumed_from"], "plain": cfg.plain,
                      "final": {k: v for k, v in final.items() if k != "step"},
                      "seconds_per_step": report["seconds_per_step"]}))
    return 0


# ---- fastcbm deal evaluate (fastcbm.deal.evaluate) ------------------------------------------------------------------
def register_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "evaluate", help="DEAL's metrics of a CLIP: disentanglability, localizability, accuracy, part mIoU",
        description="Scores a CLIP's concept explanations (category + K descriptors of each image's true class): "
                    "disentanglability σ(10·(0.2 − mean separation/100)) and the raw mean separation; localizability "
                    "by concept-level insertion against a blurred canvas (5-step fidelity and curve AUC); accuracy "
                    "with concepts (mean cosine to '{class}, which has {descriptor}.') next to zero-shot accuracy; "
                    "part mIoU of the concept maps where masks exist (testbed, or DIR/images + DIR/masks). Prints "
                    "one JSON object.")
    e.add_argument("--data", required=True,
                   help="'testbed' (fresh synthetic scenes with concept masks), an ImageFolder DIR/<class>/<image>, "
                        "or a mask folder DIR/images/<class>/<name>.jpg + DIR/masks/<name>/<concept>.png")
    e.add_argument("--concepts", type=Path, default=None,
                   help="JSON {class: [descriptors]} (default: the concepts a DEAL output folder was trained with; "
                        "for another model with --data testbed, the testbed's six descriptors per class)")
    e.add_argument("--model", default="testbed", help="'testbed', an open_clip name, or a DEAL output folder")
    e.add_argument("--pretrained", default=None, help="open_clip pretrained tag")
    e.add_argument("--k", type=int, default=None,
                   help="descriptors per class (default: the DEAL output folder's k, else 5)")
    e.add_argument("--n", type=int, default=200, help="testbed scenes (default 200)")
    e.add_argument("--seed", type=int, default=None, help="testbed scene seed (default: a fixed evaluation seed)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--insertion-steps", type=int, default=5, help="insertion steps of the fidelity (default 5)")
    e.add_argument("--curve-steps", type=int, default=20, help="points of the insertion curve (default 20)")
    e.add_argument("--localizability-images", type=int, default=None,
                   help="run the insertion test on the first N images only (default: all)")
    e.add_argument("--explain-layer", choices=("layer4", "layer3"), default=None,
                   help="ResNet towers: the stage the concept maps are computed at (default: the stage a DEAL output "
                        "folder was trained on, else layer4)")
    e.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from fastcbm.deal import data as deal_data
    from fastcbm.deal.evaluate import evaluate, folder_set, image_size, testbed_set
    from fastcbm.distributed import resolve_device
    from fastcbm.models import load_clip

    cfg_file = Path(args.model) / "config.json"
    saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    saved = saved if saved.get("format") == "fastcbm-deal" else {}
    k = args.k if args.k is not None else int(saved.get("k", 5))
    if k < 1 or args.n < 1 or args.batch_size < 1:
        raise InvalidArgument("--k, --n and --batch-size must be >= 1")
    device = resolve_device(args.device)
    testbed = args.data == "testbed"
    if args.concepts is not None:
        concepts = deal_data.load_concepts_json(args.concepts, k)
    elif saved.get("concepts"):  # a DEAL model is scored with the concepts it was trained on
        concepts = deal_data.select_concepts(saved["concepts"], k, source=str(cfg_file))
    elif testbed:
        concepts = deal_data.testbed_concepts()
    else:
        raise InvalidArgument("--concepts: required unless --data testbed or --model is a DEAL output folder")
    model, preprocess, tokenizer = load_clip(args.model, args.pretrained, device=str(device))
    if testbed:
        data = testbed_set(args.n, seed=args.seed)
    else:
        data = folder_set(args.data, preprocess, image_size(model))
    per_class = deal_data.match_classes(data.class_names, concepts)
    display = [deal_data.class_display_name(c, concepts) for c in data.class_names]
    concepts = {d: per_class[c] for c, d in zip(data.class_names, display)}
    data.class_names = display
    layer = args.explain_layer or saved.get("explain_layer", "layer4")
    result = evaluate(model, tokenizer, data, concepts, k=k, batch_size=args.batch_size, explain_layer=layer,
                      steps=args.insertion_steps, curve_steps=args.curve_steps,
                      localizability_images=args.localizability_images, testbed_masks=testbed,
                      progress=not args.no_progress)
    result = {"model": str(args.model), "data": str(args.data), **result}
    text = json.dumps(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(text)
    return 0
