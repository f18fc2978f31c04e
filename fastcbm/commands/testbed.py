"""``fastcbm testbed ...``: rebuild, score and export the synthetic testbed and its bundled models."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from fastcbm.errors import InvalidArgument, MissingFile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("testbed", help="train / evaluate the bundled testbed models, export scenes")
    sub = p.add_subparsers(dest="testbed_command", metavar="<action>", required=True)
    clip = sub.add_parser("train-clip", help="train the tiny CLIP: by default the bundled weights' six-stage schedule "
                          "(seeded, reproduces them; ~48 min on 2 CPU cores; other --threads or "
                          "--no-channels-last give other weights); with --steps/--lr/... one custom stage")
    clip.add_argument("--out", type=Path, required=True, help="folder for testbed_clip.safetensors")
    clip.add_argument("--init", type=Path,
                      help="start from these weights (fine-tuning, or resuming with --start-stage)")
    clip.add_argument("--start-stage", type=int, default=1,
                      help="resume the schedule at this stage (1-based) with --init "
                      "OUT/testbed_clip.stage{N-1}.safetensors, the weights the stage before saved")
    clip.add_argument("--threads", type=int, default=None,
                      help="torch threads (default: the bundled weights' setting); the weights depend on it")
    clip.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                      help="channels-last image tower (faster on CPU; default: the bundled weights' setting); the "
                      "weights depend on it")
    custom = clip.add_argument_group("one custom stage instead of the shipped schedule (unset: as its stage 1, "
                                     "2,500 steps, lr 2e-3, seed 0, no attribute term)")
    custom.add_argument("--steps", type=int, help="optimiser steps of the custom stage")
    custom.add_argument("--lr", type=float, help="learning rate of the custom stage")
    custom.add_argument("--seed", type=int, help="seed of the custom stage's scenes and initialisation")
    custom.add_argument("--attribute-weight", type=float,
                        help="weight of the attribute hard-negative term (shape/colour/texture templates)")
    custom.add_argument("--ring-attributes", action="store_true", default=None,
                        help="the attribute term also scores ring prompts against bare attribute words")
    clip.set_defaults(func=_train_clip)
    for kind, steps, lr in (("cnn", 1200, 2e-3), ("vit", 1500, 1e-3)):
        q = sub.add_parser(f"train-{kind}", help=f"train the tiny {kind.upper()} classifier on the rule task")
        q.add_argument("--out", type=Path, required=True, help=f"folder for the {kind.upper()}'s weights")
        q.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default {steps})")
        q.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr:g})")
        q.add_argument("--seed", type=int, default=0, help="seed of the scenes and initialisation (default 0)")
        q.set_defaults(func=_train_classifier, kind=kind)
    ev = sub.add_parser("eval", help="score the bundled models on fresh scenes (the model card's numbers)")
    ev.set_defaults(func=_evaluate)
    ex = sub.add_parser("export", help="generate scenes and write them as an ImageFolder with masks and labels")
    ex.add_argument("--out", type=Path, required=True,
                    help="folder to write: images/<class>/<n>.png, masks, labels.csv and the concept lists (an "
                         "ImageFolder for fastcbm precompute / deal train)")
    ex.add_argument("-n", type=int, default=200, help="number of scenes")
    ex.add_argument("--seed", type=int, default=None, help="default: the first evaluation seed (never trained on)")
    ex.set_defaults(func=_export)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise InvalidArgument(f"{name} must be >= 1, got {value}")


def _train_clip(args: argparse.Namespace) -> int:
    from fastcbm.testbed.train_clip import (
        SHIPPED_SCHEDULE,
        TRAIN_CHANNELS_LAST,
        TRAIN_THREADS,
        stage_weights,
        train_clip,
    )

    custom = {"steps": args.steps, "lr": args.lr, "seed": args.seed, "attribute_weight": args.attribute_weight,
              "ring_attributes": args.ring_attributes}
    schedule = SHIPPED_SCHEDULE
    if any(v is not None for v in custom.values()):
        if args.start_stage != 1:
            raise InvalidArgument("--start-stage resumes the shipped schedule; it cannot be combined with a custom stage "
                                  "(--steps/--lr/--seed/--attribute-weight/--ring-attributes)")
        # unset options default to the schedule's first stage (contrastive pre-training from scratch)
        schedule = (dataclasses.replace(SHIPPED_SCHEDULE[0], **{k: v for k, v in custom.items() if v is not None}),)
        _positive("--steps", schedule[0].steps)
    if not 1 <= args.start_stage <= len(schedule):
        raise InvalidArgument(f"--start-stage must be in 1..{len(schedule)}, got {args.start_stage}")
    if args.start_stage > 1 and args.init is None:
        raise InvalidArgument(f"--start-stage {args.start_stage} needs --init: the weights stage {args.start_stage - 1} "
                              f"saved ({stage_weights(args.out, args.start_stage - 1)})")
    if args.init is not None and not args.init.is_file():
        raise MissingFile(f"--init {args.init} not found")
    threads = TRAIN_THREADS if args.threads is None else args.threads
    _positive("--threads", threads)
    channels_last = TRAIN_CHANNELS_LAST if args.channels_last is None else args.channels_last
    print(json.dumps(train_clip(args.out, schedule, init=args.init, start_stage=args.start_stage - 1,
                                threads=threads, channels_last=channels_last)))
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from fastcbm.testbed.train_classifier import train_classifier

    _positive("--steps", args.steps)
    print(json.dumps(train_classifier(args.kind, args.out, steps=args.steps, lr=args.lr, seed=args.seed)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fastcbm.models import load_backbone, load_clip
    from fastcbm.testbed.evaluate import evaluate_classifier, evaluate_clip

    clip, _, _ = load_clip("testbed")
    scores = evaluate_clip(clip)
    scores["cnn_accuracy"] = evaluate_classifier(load_backbone("testbed").model)
    scores["vit_accuracy"] = evaluate_classifier(load_backbone("testbed-vit").model)
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from fastcbm.data import synthetic
    from fastcbm.data.export import export_image_folder

    _positive("-n", args.n)
    seed = synthetic.TRAINING_SEED_LIMIT if args.seed is None else args.seed
    images = export_image_folder(synthetic.generate(args.n, seed), args.out)
    print(json.dumps({"images": str(images), "scenes": args.n, "seed": seed}))
    return 0
