"""``fastcbm cefam <sub-command>``: CE-FAM (concept explanation via fusion of activation maps).

``fastcbm cefam train --cache CACHE [--classifier NAME] [--concepts FILE] --out DIR`` trains the translator from a
cache written by ``fastcbm precompute --cefam-classifier NAME`` (no image decoded). Sub-commands register in
``register`` below (each a function adding its parser to ``cefam``'s sub-parsers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastcbm.commands import help_without_subcommand
from fastcbm.errors import MissingFile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cefam", help="CE-FAM: train a translator from a classifier's pooled stages into CLIP space, ...",
        description="CE-FAM explains a classifier with named concepts: a translator maps its pooled stage activations "
                    "into CLIP's image-embedding space; concept regions come from Grad-CAM of the concept scores. "
                    "Start with 'fastcbm precompute --data DIR --model CLIP --out CACHE --cefam-classifier NAME "
                    "--grid 0', then 'fastcbm cefam train --cache CACHE --out MODEL'.")
    sub = p.add_subparsers(dest="cefam_command", metavar="<sub-command>")
    help_without_subcommand(p)
    register_train(sub)
    from fastcbm.commands.cefam_eval import register_evaluate

    register_evaluate(sub)


def register_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train", help="train the translator from a precompute cache (made with --cefam-classifier)",
        description="Trains CE-FAM's translator (MLP z_cat → CLIP image embedding; tanh hidden layers as the authors' "
                    "released code) from the cached pooled stages and global CLIP embeddings alone. Loss: MSE to the "
                    "un-normalised CLIP image embedding + λ·MSE of the concept scores over --concepts when given. "
                    "SGD without momentum, ×0.1 on a validation plateau, early stopping. A checkpoint is written "
                    "after every epoch: rerun the same command to resume an interrupted run.")
    t.add_argument("--cache", type=Path, required=True,
                   help="cache written by 'fastcbm precompute ... --cefam-classifier NAME' (global-only is enough)")
    t.add_argument("--out", type=Path, required=True,
                   help="model folder to write (config.json, translator.safetensors, train_report.json)")
    t.add_argument("--classifier", default=None,
                   help="classifier name; must match the cache's (default: read from the cache manifest)")
    t.add_argument("--layers", default=None,
                   help="comma-separated cached stages to use, in this order (default: all cached stages, "
                        "e.g. layer1,layer2,layer3,layer4)")
    t.add_argument("--concepts", type=Path, default=None,
                   help="concept list (text, one per line, or JSON class→list) for the L_sim term (default: none)")
    t.add_argument("--template", action="append", default=None,
                   help="concept text template, e.g. 'a photo of {}' (repeatable; default '{}')")
    t.add_argument("--lam-sim", type=float, default=0.001, help="weight λ of the concept-score MSE (default 0.001)")
    t.add_argument("--lr", type=float, default=0.1, help="SGD learning rate, no momentum (default 0.1)")
    t.add_argument("--warmup", action="store_true",
                   help="warm the rate up linearly from --lr to --warmup-lr over --warmup-epochs (default off, as "
                        "the released script)")
    t.add_argument("--warmup-lr", type=float, default=0.2, help="peak rate of the warm-up (default 0.2)")
    t.add_argument("--warmup-epochs", type=int, default=5, help="warm-up length in epochs (default 5)")
    t.add_argument("--plateau-patience", type=int, default=6,
                   help="epochs without validation improvement before the rate is cut ×0.1 (default 6 as the "
                        "released code; the paper says 4)")
    t.add_argument("--early-stop", type=int, default=10,
                   help="stop after this many epochs without validation improvement (default 10)")
    t.add_argument("--max-epochs", type=int, default=150, help="at most this many epochs (default 150)")
    t.add_argument("--batch-size", type=int, default=256, help="images per step (default 256)")
    t.add_argument("--val-fraction", type=float, default=0.1,
                   help="seeded share of the cache held out for validation (default 0.1)")
    t.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the shuffling")
    t.add_argument("--standardize", action="store_true",
                   help="train on per-channel standardised z_cat (mean/std of the training rows), folded into the "
                        "first layer when done: the saved model takes raw z_cat. Not in the released code (an "
                        "option; on the testbed it lifts val cosine 0.85 -> 0.92)")
    t.add_argument("--no-resume", action="store_true",
                   help="refuse to continue from a checkpoint in --out (default: a rerun resumes)")
    t.add_argument("--overwrite", action="store_true", help="replace a model or checkpoint already in --out")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from fastcbm.cefam.train import train_translator

    if not (args.cache / "manifest.json").is_file():
        raise MissingFile(f"--cache: no fastcbm cache at {args.cache} (manifest.json missing); run fastcbm "
                          "precompute ... --cefam-classifier NAME first")
    if args.concepts is not None and not args.concepts.is_file():
        raise MissingFile(f"--concepts: {args.concepts} does not exist or is not a file")
    _, report = train_translator(
        args.cache, args.out, classifier=args.classifier, layers=args.layers, concepts=args.concepts,
        lam_sim=args.lam_sim, lr=args.lr, warmup=args.warmup, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, plateau_patience=args.plateau_patience, early_stop=args.early_stop,
        max_epochs=args.max_epochs, batch_size=args.batch_size, val_fraction=args.val_fraction, seed=args.seed,
        resume=not args.no_resume, overwrite=args.overwrite, standardize=args.standardize, templates=tuple(args.template or ("{}",)),
        device=args.device, progress=not args.no_progress)
    best = report["best"]
    print(json.dumps({"model": str(args.out), "classifier": report["classifier"], "layers": report["layers"],
                      "epochs": report["epochs_run"], "stopped": report["stopped"], "best_epoch": report["best_epoch"],
                      "val_cos": round(best["val_cos"], 4) if best.get("val_cos") is not None else None,
                      "val_mse": best.get("val_mse"), "seconds": report["seconds"]["this_run"]}))
    return 0
