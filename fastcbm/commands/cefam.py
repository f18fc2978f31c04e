"""``fastcbm cefam <verb>``: CE-FAM (concept explanation via fusion of activation maps) of any classifier.

``train`` fits the translator (a classifier's pooled stages → CLIP's image embedding) from a cache written by
``fastcbm precompute --cefam-classifier NAME`` (no image decoded), ``evaluate`` scores concept localisation against
the CLIP-Dissect baseline, ``explain`` explains one image, ``demo`` runs everything on the synthetic testbed. Thin:
torch-heavy imports stay inside the run functions; the logic lives in :mod:`fastcbm.cefam`. Every training option is
a field of :class:`fastcbm.cefam.train.TranslatorConfig`, every demo option one of
:class:`fastcbm.cefam.demo.CEFAMDemoConfig`, and their defaults are read from there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastcbm.commands import (config_from_args, config_option, config_values, help_without_subcommand, positive,
                              refuse_other_method)
from fastcbm.errors import InvalidArgument, MissingFile

DATA_KINDS = ("broden", "imagenet-s", "testbed")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cefam", help="CE-FAM: train a translator into CLIP space, explain / evaluate a classifier's concept regions",
        description="CE-FAM explains a classifier with named concepts: a translator maps its pooled stage activations "
                    "into CLIP's image-embedding space; concept regions come from Grad-CAM of the concept scores. "
                    "Start with 'fastcbm precompute --data DIR --model CLIP --out CACHE --cefam-classifier NAME "
                    "--grid 0', then 'fastcbm cefam train --cache CACHE --out MODEL'; or see it end to end with "
                    "'fastcbm cefam demo'.")
    sub = p.add_subparsers(dest="cefam_command", metavar="<verb>")
    help_without_subcommand(p)
    register_train(sub)
    register_evaluate(sub)
    register_explain(sub)
    register_demo(sub)


# ---- fastcbm cefam train (fastcbm.cefam.train) ------------------------------------------------------------------
def register_train(sub: argparse._SubParsersAction) -> None:
    from fastcbm.cefam.train import TranslatorConfig

    d = TranslatorConfig()
    t = sub.add_parser(
        "train", help="train the translator from a precompute cache (made with --cefam-classifier)",
        description="Trains CE-FAM's translator (MLP z_cat → CLIP image embedding; tanh hidden layers as the authors' "
                    "released code) from the cached pooled stages and global CLIP embeddings alone. Loss: MSE to the "
                    "un-normalised CLIP image embedding + λ·MSE of the concept scores over --concepts when given. "
                    "SGD without momentum, ×0.1 on a validation plateau, early stopping; the defaults are the "
                    "released code's (fastcbm.cefam.train.TranslatorConfig). A checkpoint is written after every "
                    "epoch: rerun the same command to resume an interrupted run.")
    t.add_argument("--cache", type=Path, required=True,
                   help="cache written by 'fastcbm precompute ... --cefam-classifier NAME' (global-only is enough)")
    t.add_argument("--out", type=Path, required=True,
                   help="model folder to write (config.json, translator.safetensors, train_report.json)")
    config_option(t, d, "classifier", "classifier name; must match the cache's (default: read from the cache "
                  "manifest)", type=str, show_default=False)
    config_option(t, d, "layers", "comma-separated cached stages to use, in this order (default: all cached "
                  "stages, e.g. layer1,layer2,layer3,layer4)", type=str, show_default=False)
    t.add_argument("--concepts", type=Path, default=None,
                   help="concept list (text, one per line, or JSON class→list) for the L_sim term (default: none)")
    t.add_argument("--template", action="append", default=None,
                   help=f"concept text template, e.g. 'a photo of {{}}' (repeatable; default "
                        f"{', '.join(repr(x) for x in d.templates)})")
    config_option(t, d, "lam_sim", "weight λ of the concept-score MSE")
    config_option(t, d, "lr", "SGD learning rate, no momentum")
    config_option(t, d, "warmup", "warm the rate up linearly from --lr to --warmup-lr over --warmup-epochs "
                  "(default off, as the released script)")
    config_option(t, d, "warmup_lr", "peak rate of the warm-up")
    config_option(t, d, "warmup_epochs", "warm-up length in epochs")
    config_option(t, d, "plateau_patience", "epochs without validation improvement before the rate is cut ×0.1 "
                  "(the released code's; the paper says 4)")
    config_option(t, d, "early_stop", "stop after this many epochs without validation improvement")
    config_option(t, d, "max_epochs", "at most this many epochs")
    config_option(t, d, "batch_size", "images per step")
    config_option(t, d, "val_fraction", "seeded share of the cache held out for validation")
    config_option(t, d, "seed", "seed of the split, the initialisation and the shuffling")
    config_option(t, d, "standardize", "train on per-channel standardised z_cat (mean/std of the training rows), "
                  "folded into the first layer when done: the saved model takes raw z_cat. Not in the released code "
                  "(an option; on the testbed it lifts val cosine 0.85 -> 0.92)")
    t.add_argument("--no-resume", action="store_true",
                   help="refuse to continue from a checkpoint in --out (default: a rerun resumes)")
    t.add_argument("--overwrite", action="store_true", help="replace a model or checkpoint already in --out")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from fastcbm.cefam.train import TranslatorConfig, train_translator

    if not (args.cache / "manifest.json").is_file():
        raise MissingFile(f"--cache: no fastcbm cache at {args.cache} (manifest.json missing); run fastcbm "
                          "precompute ... --cefam-classifier NAME first")
    if args.concepts is not None and not args.concepts.is_file():
        raise MissingFile(f"--concepts: {args.concepts} does not exist or is not a file")
    settings = config_values(args)
    if args.template:
        settings["templates"] = tuple(args.template)
    _, report = train_translator(args.cache, args.out, TranslatorConfig.from_settings(**settings),
                                 concepts=args.concepts, resume=not args.no_resume, overwrite=args.overwrite,
                                 device=args.device, progress=not args.no_progress)
    best = report["best"]
    print(json.dumps({"model": str(args.out), "classifier": report["classifier"], "layers": report["layers"],
                      "epochs": report["epochs_run"], "stopped": report["stopped"], "best_epoch": report["best_epoch"],
                      "val_cos": round(best["val_cos"], 4) if best.get("val_cos") is not None else None,
                      "val_mse": best.get("val_mse"), "seconds": report["seconds"]["this_run"]}))
    return 0


# ---- fastcbm cefam evaluate (fastcbm.cefam.evaluate) ----------------------------------------------------------------
def register_evaluate(sub: argparse._SubParsersAction) -> None:
    from fastcbm.cefam.datasets import TestbedDataset
    from fastcbm.cefam.evaluate import TESTBED_PROBE_SCENES, EvalConfig
    from fastcbm.commands import signature_defaults

    d = EvalConfig()
    n_testbed = signature_defaults(TestbedDataset.__init__)["n"]
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
    config_option(e, d, "batch_size", "images per region/association call")
    e.add_argument("--limit", type=int, default=None, help="Broden / ImageNet-S: at most this many mask files")
    e.add_argument("--n", type=int, default=n_testbed, help=f"testbed: number of fresh scenes (default {n_testbed})")
    e.add_argument("--seed", type=int, default=None, help="testbed: first seed (>= 1,000,000; default fixed)")
    e.add_argument("--probe-n", type=int, default=None,
                   help=f"testbed: CLIP-Dissect labels its neurons on this many separate fresh scenes (default "
                        f"{TESTBED_PROBE_SCENES}; 0: on the evaluated scenes). Broden / ImageNet-S: always the "
                        "evaluated images")
    e.add_argument("--names", type=Path, default=None, help="ImageNet-S: list file of 'image mask' lines")
    e.add_argument("--class-names", type=Path, default=None,
                   help="ImageNet-S: JSON {wnid: name} or 'wnid name' lines (default: the wnid is the concept)")
    e.add_argument("--imagenet-s-authors-target", action="store_true",
                   help="ImageNet-S: reproduce the authors' target = the largest mask id present, which is the ignore "
                        "region (1000) whenever an image has one (a bug; default: 1000 is never the target)")
    config_option(e, d, "association_variant", "association score: softmax over the concept set (official) or S_t "
                  "itself (paper)", choices=("official", "paper"))
    config_option(e, d, "top_k", "channels masked by the association")
    config_option(e, d, "baseline", "skip the CLIP-Dissect baseline")
    config_option(e, d, "device", "torch device")
    config_option(e, d, "progress", "no progress bar")
    e.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from fastcbm.cefam.evaluate import TESTBED_PROBE_SCENES, EvalConfig, evaluate_model_dir, testbed_probe
    from fastcbm.files import atomic_write_text

    kind, *rest = args.data
    if kind not in DATA_KINDS:
        raise InvalidArgument(f"--data must be one of {', '.join(DATA_KINDS)}; got {kind!r}")
    if kind != "testbed" and len(rest) != 1:
        raise InvalidArgument(f"--data {kind} needs exactly one PATH (the dataset's root folder)")
    if kind == "testbed" and rest:
        raise InvalidArgument("--data testbed takes no PATH (use --n and --seed)")
    positive(batch_size=args.batch_size, top_k=args.top_k)
    if not args.model.is_dir():
        raise MissingFile(f"--model {args.model} does not exist (a folder written by fastcbm cefam train)")
    refuse_other_method(args.model, "cefam", "evaluate")
    options: dict = {}
    if kind in ("broden", "imagenet-s") and args.limit is not None:
        options["limit"] = args.limit
    if kind == "imagenet-s":
        options.update(names=args.names, class_names=args.class_names,
                       authors_target=args.imagenet_s_authors_target)
    if args.probe_n is not None and kind != "testbed":
        raise InvalidArgument("--probe-n applies to --data testbed only (Broden / ImageNet-S probe the evaluated images)")
    probe = testbed_probe(TESTBED_PROBE_SCENES if args.probe_n is None else args.probe_n) if kind == "testbed" else None
    cfg = config_from_args(EvalConfig(), args, probe=probe)
    result = evaluate_model_dir(args.model, kind, rest[0] if rest else None, config=cfg,
                                n=args.n if kind == "testbed" else None, seed=args.seed, **options)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


# ---- fastcbm cefam explain (fastcbm.cefam.explain) ------------------------------------------------------------------
def register_explain(sub: argparse._SubParsersAction) -> None:
    from fastcbm.cefam.explain import TOP_K

    p = sub.add_parser(
        "explain", help="explain one image with a trained CE-FAM: top concepts, their stage, contributions, regions",
        description="Prints the image's top concepts, the stage the association chose for each, their contributions "
                    "to the predicted class and region statistics as JSON; --html writes a page with the regions, "
                    "--png a strip (the image, then each concept's region).")
    p.add_argument("image", type=Path, help="image file (any format PIL reads)")
    p.add_argument("--model", type=Path, required=True, help="CE-FAM model folder (fastcbm cefam train --out)")
    p.add_argument("--concepts", type=Path, help="concept list, one per line (default: the testbed vocabulary for a "
                   "testbed classifier)")
    p.add_argument("--template", action="append", help="text template for --concepts, e.g. 'a photo of a {}' "
                   "(repeatable)")
    p.add_argument("--top-k", type=int, default=TOP_K, help=f"concepts explained (default {TOP_K}, as the authors)")
    p.add_argument("--html", type=Path, help="also write an HTML page with the regions")
    p.add_argument("--png", type=Path, help="also write a PNG strip (the image, then each concept's region)")
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    from fastcbm.cefam.explain import explain_file

    positive(top_k=args.top_k)
    if not args.model.is_dir():
        raise MissingFile(f"--model {args.model} does not exist (a folder written by fastcbm cefam train)")
    refuse_other_method(args.model, "cefam", "explain")
    if not args.image.is_file():
        raise MissingFile(f"image {args.image} does not exist")
    if args.concepts is not None and not args.concepts.is_file():
        raise MissingFile(f"--concepts {args.concepts} not found")
    result = explain_file(args.model, args.image, concepts_file=args.concepts, templates=args.template,
                          top_k=args.top_k, html=args.html, png=args.png)
    print(json.dumps(result, indent=2))
    return 0


# ---- fastcbm cefam demo (fastcbm.cefam.demo) ------------------------------------------------------------------------
MIN_SCENES = 10


def register_demo(sub: argparse._SubParsersAction) -> None:
    from fastcbm.cefam.demo import DEMO_CLASSIFIERS, CEFAMDemoConfig

    d = CEFAMDemoConfig()
    p = sub.add_parser(
        "demo", help="CE-FAM end to end on the synthetic testbed: translator, regions vs masks, CLIP-Dissect, page",
        description="Generates testbed scenes, precomputes the global CLIP embedding and the bundled classifier's "
                    "pooled stages (no ring prompts), trains the translator (fastcbm.cefam.demo.DEMO_TRANSLATOR), "
                    "evaluates the concept regions against the scenes' concept masks and the CLIP-Dissect baseline, "
                    "writes an HTML page and summary.json and prints one JSON line.")
    config_option(p, d, "out", "output folder")
    config_option(p, d, "n_train", f"training scenes, at least {MIN_SCENES}")
    config_option(p, d, "n_test", f"fresh test scenes, at least {MIN_SCENES}")
    config_option(p, d, "classifier", "the classifier explained: the bundled CNN (four stages, the association "
                  "picks one per concept) or the bundled ViT (its last block's tokens, one stage)",
                  choices=DEMO_CLASSIFIERS)
    config_option(p, d, "n_probe", "separate fresh scenes CLIP-Dissect labels its neurons on (0: the test scenes)",
                  flag="--probe-n")
    config_option(p, d, "seed", "seed of the generated scenes and training")
    config_option(p, d, "device", "torch device")
    config_option(p, d, "progress", "no progress bars")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """One JSON line (the summary; the full result is in OUT/summary.json)."""
    from fastcbm.cefam.demo import CEFAMDemoConfig, run_cefam_demo

    for name in ("n_train", "n_test"):
        if getattr(args, name) < MIN_SCENES:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be >= {MIN_SCENES}, got {getattr(args, name)}")
    if args.n_probe < 0:
        raise InvalidArgument(f"--probe-n must be >= 0, got {args.n_probe}")
    result = run_cefam_demo(config_from_args(CEFAMDemoConfig(), args))
    print(json.dumps({k: result[k] for k in ("method", "quality", "summary", "report", "model", "seconds")},
                     separators=(",", ":")))
    return 0
