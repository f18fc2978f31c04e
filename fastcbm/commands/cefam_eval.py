"""CE-FAM's evaluation command line: ``fastcbm cefam evaluate`` (registered by :mod:`fastcbm.commands.cefam`), and the
``--method cefam`` branches of ``fastcbm explain`` and ``fastcbm demo``. Thin: torch-heavy imports inside the run
functions; the logic lives in :mod:`fastcbm.cefam.evaluate`, :mod:`fastcbm.cefam.explain`, :mod:`fastcbm.cefam.demo`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastcbm.errors import InvalidArgument, MissingFile


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "evaluate", help="concept-localisation evaluation (NRA, EPG, hit rate) vs the CLIP-Dissect baseline",
        description="For each image, its present concepts: CE-FAM regions at every stage, the stage chosen by the layer "
                    "association (paper Table 2) and the best stage (paper Table 1, an ORACLE that looks at the mask); "
                    "NRA (official and paper variants), EPG and hit rate per concept type and their mean; the "
                    "CLIP-Dissect baseline (soft-WPMI neuron labels) on the same classifier and images. Prints JSON.")
    e.add_argument("--data", required=True, nargs="+", metavar=("KIND", "PATH"),
                   help="broden PATH | imagenet-s PATH | testbed (Broden: label.csv + images/{ade20k,dtd,opensurfaces,"
                        "pascal}; ImageNet-S: validation/ + validation-segmentation/)")
    e.add_argument("--model", type=Path, required=True, help="CE-FAM model folder (fastcbm cefam train --out)")
    e.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    e.add_argument("--batch-size", type=int, default=16, help="images per region/association call (default 16)")
    e.add_argument("--limit", type=int, default=None, help="Broden / ImageNet-S: at most this many mask files")
    e.add_argument("--n", type=int, default=200, help="testbed: number of fresh scenes (default 200)")
    e.add_argument("--seed", type=int, default=None, help="testbed: first seed (>= 1,000,000; default fixed)")
    e.add_argument("--probe-n", type=int, default=None,
                   help="testbed: CLIP-Dissect labels its neurons on this many separate fresh scenes (default 2000; "
                        "0: on the evaluated scenes). Broden / ImageNet-S: always the evaluated images")
    e.add_argument("--names", type=Path, default=None, help="ImageNet-S: list file of 'image mask' lines")
    e.add_argument("--class-names", type=Path, default=None,
                   help="ImageNet-S: JSON {wnid: name} or 'wnid name' lines (default: the wnid is the concept)")
    e.add_argument("--imagenet-s-authors-target", action="store_true",
                   help="ImageNet-S: reproduce the authors' target = the largest mask id present, which is the ignore "
                        "region (1000) whenever an image has one (a bug; default: 1000 is never the target)")
    e.add_argument("--association-variant", choices=("official", "paper"), default="official",
                   help="association score: softmax over the concept set (official) or S_t itself (paper)")
    e.add_argument("--top-k", type=int, default=20, help="channels masked by the association (default 20)")
    e.add_argument("--no-baseline", action="store_true", help="skip the CLIP-Dissect baseline")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from fastcbm.cefam.evaluate import TESTBED_PROBE_SCENES, EvalConfig, evaluate_model_dir, testbed_probe

    kind, *rest = args.data
    if kind not in ("broden", "imagenet-s", "testbed"):
        raise InvalidArgument(f"--data must be one of broden, imagenet-s, testbed; got {kind!r}")
    if kind != "testbed" and len(rest) != 1:
        raise InvalidArgument(f"--data {kind} needs exactly one PATH (the dataset's root folder)")
    if kind == "testbed" and rest:
        raise InvalidArgument("--data testbed takes no PATH (use --n and --seed)")
    if args.batch_size < 1 or args.top_k < 1:
        raise InvalidArgument(f"--batch-size and --top-k must be >= 1, got {args.batch_size}, {args.top_k}")
    if not args.model.is_dir():
        raise MissingFile(f"--model {args.model} does not exist (a folder written by fastcbm cefam train)")
    options: dict = {}
    if kind in ("broden", "imagenet-s") and args.limit is not None:
        options["limit"] = args.limit
    if kind == "imagenet-s":
        options.update(names=args.names, class_names=args.class_names,
                       authors_target=args.imagenet_s_authors_target)
    if args.probe_n is not None and kind != "testbed":
        raise InvalidArgument("--probe-n applies to --data testbed only (Broden / ImageNet-S probe the evaluated images)")
    probe = testbed_probe(TESTBED_PROBE_SCENES if args.probe_n is None else args.probe_n) if kind == "testbed" else None
    cfg = EvalConfig(batch_size=args.batch_size, association_variant=args.association_variant, top_k=args.top_k,
                     baseline=not args.no_baseline, progress=not args.no_progress, device=args.device, probe=probe)
    result = evaluate_model_dir(args.model, kind, rest[0] if rest else None, config=cfg,
                                n=args.n if kind == "testbed" else None, seed=args.seed, **options)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


def run_explain(args: argparse.Namespace) -> int:
    """``fastcbm explain --method cefam --model DIR IMAGE [--concepts FILE] [--html F] [--png F]``."""
    from fastcbm.cefam.explain import explain_file

    if args.model is None:
        raise InvalidArgument("--model DIR is required with --method cefam (a folder written by fastcbm cefam train)")
    if not Path(args.model).is_dir():
        raise MissingFile(f"--model {args.model} does not exist (a folder written by fastcbm cefam train)")
    concepts = getattr(args, "concepts", None)
    if concepts is not None and not Path(concepts).is_file():
        raise MissingFile(f"--concepts {concepts} not found")
    result = explain_file(args.model, args.image, concepts_file=concepts, templates=getattr(args, "template", None),
                          top_k=args.top_k, html=getattr(args, "html", None), png=getattr(args, "png", None))
    print(json.dumps(result, indent=2))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``fastcbm demo --method cefam``: one JSON line (the summary; the full result is in OUT/summary.json)."""
    from fastcbm.cefam.demo import CEFAMDemoConfig, run_cefam_demo

    out = args.out if str(args.out) != "fastcbm_out/demo" else Path("fastcbm_out/demo-cefam")
    result = run_cefam_demo(CEFAMDemoConfig(out=out, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                                            device=args.device, progress=not args.no_progress,
                                            classifier=getattr(args, "classifier", "testbed")))
    print(json.dumps({k: result[k] for k in ("method", "quality", "summary", "report", "model", "seconds")},
                     separators=(",", ":")))
    return 0
