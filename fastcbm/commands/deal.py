"""``fastcbm deal <verb>``: DEAL (disentangle and localize concept-level explanations of a CLIP).

``train`` fine-tunes a CLIP (the output folder loads back with ``load_clip(DIR)`` / ``--model DIR`` everywhere),
``evaluate`` scores any CLIP's concept explanations with DEAL's metrics, ``explain`` shows one image's concept maps,
``demo`` compares DEAL with plain fine-tuning on the synthetic testbed. Thin: torch-heavy imports stay inside the run
functions; the logic lives in :mod:`fastcbm.deal`. Every training option is a field of
:class:`fastcbm.deal.train.DealConfig` and every demo option one of :class:`fastcbm.deal.demo.DealDemoConfig`; their
defaults are read from there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastcbm.commands import (config_from_args, config_option, help_without_subcommand, positive,
                              refuse_other_method, signature_defaults)
from fastcbm.errors import InvalidArgument, MissingFile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deal", help="DEAL: fine-tune CLIP so concept explanations are disentangled and localized",
        description="DEAL fine-tunes a CLIP with a contrastive loss on concept-augmented captions plus regularisers "
                    "on differentiable concept explanations (separation between concepts, consistency with the "
                    "category). Start with 'fastcbm deal train --data DIR --concepts concepts.json --out DIR'; or "
                    "see it against plain fine-tuning with 'fastcbm deal demo'.")
    sub = p.add_subparsers(dest="deal_command", metavar="<verb>")
    help_without_subcommand(p)
    register_train(sub)
    register_evaluate(sub)
    register_explain(sub)
    register_demo(sub)


def _model_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--model", default="testbed", help=f"CLIP {what}: 'testbed', an open_clip name such as ViT-B-32, "
                   "or a DEAL output folder (default testbed)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (default: none = random init)")


# ---- fastcbm deal train (fastcbm.deal.train) --------------------------------------------------------------------
def register_train(sub: argparse._SubParsersAction) -> None:
    from fastcbm.deal.data import CAPTION_FORMS
    from fastcbm.deal.explain import MODES, RESNET_LAYERS
    from fastcbm.deal.losses import LOSS_FORMS
    from fastcbm.deal.train import DealConfig

    d = DealConfig()
    t = sub.add_parser(
        "train", help="fine-tune a CLIP with DEAL (or --plain contrastive fine-tuning, the baseline)",
        description="Fine-tunes a CLIP with DEAL's objective: symmetric InfoNCE on '{class}. It may contain c1, ..., "
                    "cK' captions + λ_sep·separation + λ_con·consistency + λ_spa·sparsity of the concept "
                    "explanations, whose gradients reach the image tower (the authors' released code detaches "
                    "them). Defaults are the published settings (fastcbm.deal.train.DealConfig). A checkpoint is "
                    "written every --checkpoint-every steps: rerun the same command to resume.")
    t.add_argument("--data", type=Path, required=True,
                   help="ImageFolder directory DIR/<class>/<image> (a 'fastcbm testbed export' folder works too)")
    t.add_argument("--concepts", type=Path, required=True,
                   help="JSON {class: [descriptors]} (the authors' format; folder names match with '_' as a space)")
    _model_options(t, "to fine-tune")
    t.add_argument("--out", type=Path, required=True,
                   help="output folder (config.json, weights.safetensors, train_report.json, checkpoint/)")
    config_option(t, d, "k", "descriptors per class")
    config_option(t, d, "steps", "optimiser steps (default: --epochs passes)", type=int, show_default=False)
    config_option(t, d, "epochs", "passes over the data")
    config_option(t, d, "batch_size", "images per step")
    config_option(t, d, "lr", "Adam learning rate")
    config_option(t, d, "weight_decay", "Adam weight decay")
    config_option(t, d, "lambda_sep", "weight of the separation term")
    config_option(t, d, "lambda_con", "weight of the consistency term")
    config_option(t, d, "lambda_spa", "weight of the sparsity term")
    config_option(t, d, "caption_form", "'code': '{class}. It may contain c1, ..., cK' (released code); 'paper': "
                  "'An image of {class} with c1, ..., and cK'", choices=CAPTION_FORMS)
    config_option(t, d, "loss_form", "'code': products / squared sums as the released code; 'paper': L1 distances",
                  choices=LOSS_FORMS)
    config_option(t, d, "plain", "baseline: same steps, data order and captions, regularisers off")
    config_option(t, d, "mode", "how the K+1 explanation gradients are computed (auto: the closed-form / CLS-only "
                  "fast path where it applies)", choices=MODES)
    config_option(t, d, "seed", "data order seed")
    config_option(t, d, "checkpoint_every", "steps between checkpoints (0: only at the end)")
    config_option(t, d, "explain_text_grad", "also send the regularisers' gradient into the text tower through the "
                  "K+1 explained texts (default: those texts are encoded without gradient, so the regularisers train "
                  "the image tower only; 2.5x the cost of a plain step on a ViT-B/32-shaped model instead of 1.5x)")
    config_option(t, d, "explain_layer", "ResNet towers: the stage Grad-CAM explains (layer4 as published; layer3: "
                  "a 2x finer grid, gradients through layer4). ViT towers: always the last block",
                  choices=RESNET_LAYERS)
    config_option(t, d, "amp", "no bf16 autocast on CUDA (CPU never uses it)")
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
    refuse_other_method(args.model, "deal", "train")
    cfg = config_from_args(DealConfig(), args)
    report = train_deal(args.data, args.concepts, args.model, cfg, args.out, pretrained=args.pretrained,
                        resume=not args.no_resume, progress=not args.no_progress,
                        device=resolve_device(args.device))
    final = report["final"] or {}
    print(json.dumps({"model": str(args.out), "base_model": report["base_model"], "steps": report["steps"],
                      "resumed_from": report["resumed_from"], "plain": cfg.plain,
                      "final": {k: v for k, v in final.items() if k != "step"},
                      "seconds_per_step": report["seconds_per_step"]}))
    return 0


# ---- the CLIP, its concepts and its explained stage (evaluate, explain) ---------------------------------------------
def _saved(model: str) -> dict:
    """A DEAL output folder's config.json ({} for a CLIP name or another folder)."""
    from fastcbm.deal.train import FORMAT

    cfg_file = Path(model) / "config.json"
    try:
        saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except ValueError:
        return {}
    return saved if isinstance(saved, dict) and saved.get("format") == FORMAT else {}


def _concepts(args: argparse.Namespace, saved: dict, k: int, testbed: bool) -> dict[str, list[str]]:
    """``--concepts``, else the concepts a DEAL folder was trained on, else (``testbed``) the testbed's."""
    from fastcbm.deal import data as deal_data

    if args.concepts is not None:
        return deal_data.load_concepts_json(args.concepts, k)
    if saved.get("concepts"):  # a DEAL model is scored with the concepts it was trained on
        return deal_data.select_concepts(saved["concepts"], k, source=str(Path(args.model) / "config.json"))
    if testbed:
        return deal_data.testbed_concepts()
    raise InvalidArgument("--concepts: required unless --data testbed / --model testbed, or --model is a DEAL output "
                          "folder")


def _concept_options(p: argparse.ArgumentParser, k_default: int) -> None:
    p.add_argument("--concepts", type=Path, default=None,
                   help="JSON {class: [descriptors]} (default: the concepts a DEAL output folder was trained with; "
                        "for the testbed, its six descriptors per class)")
    p.add_argument("--k", type=int, default=None,
                   help=f"descriptors per class (default: the DEAL output folder's k, else {k_default})")
    p.add_argument("--explain-layer", choices=("layer4", "layer3"), default=None,
                   help="ResNet towers: the stage the concept maps are computed at (default: the stage a DEAL output "
                        "folder was trained on, else layer4)")


# ---- fastcbm deal evaluate (fastcbm.deal.evaluate) ------------------------------------------------------------------
def register_evaluate(sub: argparse._SubParsersAction) -> None:
    from fastcbm.deal.evaluate import evaluate, testbed_set

    d, n_testbed = signature_defaults(evaluate), signature_defaults(testbed_set)["n"]
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
    _model_options(e, "to score")
    _concept_options(e, d["k"])
    e.add_argument("--n", type=int, default=n_testbed, help=f"testbed scenes (default {n_testbed})")
    e.add_argument("--seed", type=int, default=None, help="testbed scene seed (default: a fixed evaluation seed)")
    e.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"images per batch (default {d['batch_size']})")
    e.add_argument("--insertion-steps", type=int, default=d["steps"],
                   help=f"insertion steps of the fidelity (default {d['steps']})")
    e.add_argument("--curve-steps", type=int, default=d["curve_steps"],
                   help=f"points of the insertion curve (default {d['curve_steps']})")
    e.add_argument("--localizability-images", type=int, default=None,
                   help="run the insertion test on the first N images only (default: all)")
    e.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from fastcbm.deal import data as deal_data
    from fastcbm.deal.evaluate import evaluate, folder_set, image_size, testbed_set
    from fastcbm.distributed import resolve_device
    from fastcbm.files import atomic_write_text
    from fastcbm.models import load_clip

    refuse_other_method(args.model, "deal", "evaluate")
    saved = _saved(args.model)
    k = args.k if args.k is not None else int(saved.get("k", signature_defaults(evaluate)["k"]))
    positive(k=k, n=args.n, batch_size=args.batch_size)
    device = resolve_device(args.device)
    testbed = args.data == "testbed"
    concepts = _concepts(args, saved, k, testbed)
    model, preprocess, tokenizer = load_clip(args.model, args.pretrained, device=str(device))
    data = testbed_set(args.n, seed=args.seed) if testbed else folder_set(args.data, preprocess, image_size(model))
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
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


# ---- fastcbm deal explain (fastcbm.deal.explain, fastcbm.deal.report) -----------------------------------------------
def register_explain(sub: argparse._SubParsersAction) -> None:
    from fastcbm.deal.evaluate import evaluate

    p = sub.add_parser(
        "explain", help="one image's concept maps from a DEAL (or any) CLIP: the class, then each of its concepts",
        description="Explains one image with a CLIP's concept maps, as DEAL trains and scores them: the category "
                    "text and the class's K descriptors, each map Grad-CAM of the image-text score (ResNet towers) or "
                    "the last block's attention relevance (ViT towers). The class is --class, else the CLIP's "
                    "zero-shot prediction among the concept file's classes. Prints JSON (the class, the texts and "
                    "their scores); --html writes a page with the maps.")
    p.add_argument("image", type=Path, help="image file (any format PIL reads)")
    _model_options(p, "to explain")
    _concept_options(p, signature_defaults(evaluate)["k"])
    p.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                   help="explain this class (a key of the concepts; default: the zero-shot prediction)")
    p.add_argument("--html", type=Path, help="also write an HTML page with the maps")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    import torch

    from fastcbm.deal.evaluate import evaluate, image_size
    from fastcbm.deal.explain import encode_text_rows, explanations
    from fastcbm.deal.metrics import CLASS_TEMPLATE
    from fastcbm.distributed import resolve_device
    from fastcbm.models import load_clip

    if not args.image.is_file():
        raise MissingFile(f"image {args.image} does not exist")
    refuse_other_method(args.model, "deal", "explain")
    saved = _saved(args.model)
    k = args.k if args.k is not None else int(saved.get("k", signature_defaults(evaluate)["k"]))
    positive(k=k)
    concepts = _concepts(args, saved, k, args.model == "testbed")
    classes = list(concepts)
    if args.class_name is not None and args.class_name not in concepts:
        raise InvalidArgument(f"--class {args.class_name!r} is not a class of the concepts (e.g. {classes[:3]})")
    device = resolve_device(args.device)
    model, preprocess, tokenizer = load_clip(args.model, args.pretrained, device=str(device))
    raw, x = _read_image(args.image, preprocess, image_size(model), device)
    with torch.no_grad():  # zero-shot over the concept file's classes, with the CLIP's own logit scale
        img = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
        cls_emb = encode_text_rows(model, tokenizer, [[CLASS_TEMPLATE.format(cls=c) for c in classes]])[0]
        scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
        probs = (scale * img @ cls_emb.float().T).softmax(-1)[0]
        cls = args.class_name or classes[int(probs.argmax())]
        texts = [cls, *concepts[cls][:k]]
        emb = encode_text_rows(model, tokenizer, [texts])  # [1, K+1, D]; the maps need no text gradient
    layer = args.explain_layer or saved.get("explain_layer", "layer4")
    maps = explanations(model, x, emb, create_graph=False, layer=layer)[0].detach().cpu()  # [K+1, h, w]
    scores = (img @ emb[0].float().T)[0].tolist()
    top = probs.argsort(descending=True)[:3].tolist()
    result = {"image": str(args.image), "model": str(args.model), "class": cls,
              "class_source": "--class" if args.class_name else "zero-shot prediction",
              "zero_shot": [{"class": classes[i], "probability": round(float(probs[i]), 4)} for i in top],
              "texts": [{"text": t, "score": round(s, 4)} for t, s in zip(texts, scores)],
              "explain_layer": layer, "map_size": list(maps.shape[-2:])}
    if args.html is not None:
        from fastcbm.deal.report import write_deal_report

        write_deal_report(args.html, image=raw, maps={Path(str(args.model)).name or str(args.model): maps},
                          texts=texts, title="fastcbm DEAL explanation",
                          summary={"image": str(args.image), "model": str(args.model), "class": cls,
                                   "class source": result["class_source"], "explain layer": layer})
        result["html"] = str(args.html)
    print(json.dumps(result, indent=2))
    return 0


def _read_image(path: Path, preprocess, size: int, device):
    """``(uint8 [3, S, S] for the page, the CLIP's input [1, 3, S, S])``: the model sees its own preprocessing (as
    ``fastcbm deal evaluate`` on a folder); the page shows the image resized and centre-cropped to the same side."""
    from PIL import Image

    from fastcbm.data.folder import BadImageError, decode_image

    try:
        raw = decode_image(path, size)
        with Image.open(path) as img:
            x = preprocess(img.convert("RGB"))[None].to(device)
    except (BadImageError, OSError, ValueError) as exc:
        raise InvalidArgument(f"image {path}: {exc}") from None
    return raw, x


# ---- fastcbm deal demo (fastcbm.deal.demo) --------------------------------------------------------------------------
def register_demo(sub: argparse._SubParsersAction) -> None:
    from fastcbm.deal.demo import DealDemoConfig

    d = DealDemoConfig()
    p = sub.add_parser(
        "demo", help="DEAL vs plain fine-tuning of the testbed CLIP: metrics before / after, concept-map page",
        description="Fine-tunes the bundled testbed CLIP twice from the same weights, with DEAL's regularisers and "
                    "without (same steps, data order and captions), scores the base, plain and DEAL models on fresh "
                    "scenes with concept masks (disentanglability, localizability, accuracy with concepts vs "
                    "zero-shot, part mIoU), writes an HTML page of one image's concept maps and summary.json and "
                    "prints one JSON line. Its settings and why: fastcbm.deal.demo, docs/deal_testbed.md.")
    config_option(p, d, "out", "output folder")
    config_option(p, d, "steps", "optimiser steps of each run")
    config_option(p, d, "lr", "Adam learning rate of both runs")
    config_option(p, d, "n_train", "fresh training scenes")
    config_option(p, d, "n_eval", "fresh evaluation scenes with concept masks")
    config_option(p, d, "n_accuracy", "further fresh scenes for the accuracies (0: the evaluation scenes)")
    config_option(p, d, "seed", "seed of the scenes and the data order")
    config_option(p, d, "device", "torch device")
    config_option(p, d, "progress", "no progress bars")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from fastcbm.deal.demo import DealDemoConfig, run_deal_demo

    positive(steps=args.steps, n_train=args.n_train, n_eval=args.n_eval)
    if args.n_accuracy < 0:
        raise InvalidArgument(f"--n-accuracy must be >= 0, got {args.n_accuracy}")
    print(json.dumps(run_deal_demo(config_from_args(DealDemoConfig(), args)), separators=(",", ":")))
    return 0
