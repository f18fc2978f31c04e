"""``fastcbm precompute`` (images → prompt-embedding cache) and ``fastcbm similarities`` (cache → P files)."""

from __future__ import annotations

import argparse
import logging

from fastcbm.errors import InvalidArgument

log = logging.getLogger("fastcbm.commands.precompute")


def register(subparsers: argparse._SubParsersAction) -> None:
    from fastcbm.precompute.config import PrecomputeConfig

    d = PrecomputeConfig()  # every default below is read from here: the CLI, the API and the demos share them
    p = subparsers.add_parser(
        "precompute", help="encode images with red-ring prompts into a sharded prompt-embedding cache",
        description="Stream images, render G ring prompts per image, encode them with CLIP's image tower and store "
                    "unit prompt embeddings E[N,G,D] and global embeddings E0[N,D] (fp16, with norms) in a "
                    "resumable sharded cache. Rerun the same command to resume an interrupted run.")
    p.add_argument("--data", required=True, help="image folder (recursive, ImageFolder layout allowed) or a text "
                   "file listing image paths")
    p.add_argument("--model", required=True, help="CLIP model name for fastcbm.models.load_clip (e.g. ViT-B-16)")
    p.add_argument("--pretrained", default=None, help="pretrained tag (open_clip) or checkpoint")
    p.add_argument("--out", required=True, help="cache directory (created, or resumed if it exists)")
    p.add_argument("--grid", type=int, default=d.grid, help=f"rings per axis (G = grid²), default {d.grid}; 0: no ring prompts, "
                   "only the global embedding (the cheap mode for CE-FAM; SALF-CBM needs prompts)")
    p.add_argument("--no-prompts", action="store_true", help="same as --grid 0")
    p.add_argument("--radius", type=float, default=None, help="ring radius in px (default 32·S/224)")
    p.add_argument("--width", type=float, default=d.width, help=f"ring line width in px (default {d.width:g})")
    p.add_argument("--centers", choices=("inset", "paper"), default=d.centers,
                   help=f"ring centres: inset (every ring inside the image) or paper (k·⌊S/(G−1)⌋); default {d.centers}")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default 64 GPU, 4 CPU)")
    p.add_argument("--max-encode-batch", type=int, default=None,
                   help="prompted images per encoder forward (default 1024 GPU; CPU: about 1 M pixels, 20 at 224 px)")
    p.add_argument("--shard-size", type=int, default=d.shard_size,
                   help=f"input images per cache shard (default {d.shard_size})")
    p.add_argument("--device", default=d.device, help=f"auto | cpu | cuda | cuda:N (default {d.device})")
    p.add_argument("--dtype", default=d.dtype, choices=("auto", "bf16", "fp16", "fp32"),
                   help="encoder precision (auto: bf16 autocast on GPU, fp32 on CPU)")
    p.add_argument("--loader", default=d.loader, choices=("auto", "torch", "dali"),
                   help="image decoding: torch/PIL workers or NVIDIA DALI (auto: DALI on a GPU when installed)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="decoding worker processes (torch loader; default: min(4, cores))")
    p.add_argument("--features", default=None, metavar="BACKBONE",
                   help="also store this backbone's feature maps resized to the grid (a fastcbm.models.load_backbone "
                        "name: testbed, resnet50, a timm name, ...); needed by 'fastcbm salf train'")
    p.add_argument("--features-layer", default=None, metavar="MODULE",
                   help="backbone module whose output is stored (default: its last feature layer, e.g. layer4); "
                   "for a ViT, 'blocks.11+cls' concatenates the class token to every patch token on channels")
    p.add_argument("--features-random-init", action="store_true",
                   help="use a randomly initialised --features backbone (testing; no weight download)")
    p.add_argument("--cefam-classifier", default=None, metavar="NAME",
                   help="also store this classifier's pooled stage activations z_cat (CE-FAM's translator input; a "
                        "fastcbm.models.load_backbone name: testbed, resnet50, ...); needed by 'fastcbm cefam train'")
    p.add_argument("--cefam-layers", default=None, metavar="L1,L2,...",
                   help="comma-separated stages pooled into z_cat, in this order (default: a CNN's feature layers, "
                        "e.g. layer1,layer2,layer3,layer4; a ViT's last block)")
    p.add_argument("--cefam-random-init", action="store_true",
                   help="use a randomly initialised --cefam-classifier (testing; no weight download)")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="let the JPEG decoder downscale by a power of two first (several times faster decoding of "
                        "large photos for small encoders; slightly different pixels, recorded in the manifest)")
    p.add_argument("--verify", choices=("checksum", "size"), default=d.verify,
                   help="how finished shards are checked when resuming")
    p.add_argument("--engine", choices=("torch", "onnxruntime", "tensorrt"), default=d.engine,
                   help="what runs the image tower: PyTorch, or an exported ONNX graph on onnxruntime / a TensorRT "
                        "engine (cached by GPU, TensorRT version and graph hash); see fastcbm export")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_precompute)

    s = subparsers.add_parser(
        "similarities", help="write P = E·Tᵀ (prompt × concept similarities) from a cache, in chunks",
        description="Compute cosine similarities between the cached prompt embeddings and the text embeddings of a "
                    "concept list, and write them as chunked .npy files P-00000.npy [rows, G, M] (+ index.json).")
    s.add_argument("--cache", required=True, help="cache directory written by fastcbm precompute")
    s.add_argument("--concepts", required=True, help="text file, one concept per line")
    s.add_argument("--model", required=True, help="the CLIP model the cache was made with")
    s.add_argument("--pretrained", default=None, help="the pretrained tag the cache was made with")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--chunk", type=int, default=4096, help="images per output file (default 4096)")
    s.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the written similarities (default float16)")
    s.add_argument("--device", default=None, help="torch device of the text encoder and the products (default: cuda "
                   "when available, else cpu)")
    s.add_argument("--template", default="{}", help="text template for each concept, e.g. 'a photo of {}'")
    s.add_argument("--verify", action="store_true",
                   help="check every cache file (sizes, headers, sha256, NaN/inf) before writing anything; without "
                        "it each file is checked the first time it is read")
    s.set_defaults(func=run_similarities)


def run_precompute(args: argparse.Namespace) -> int:
    from fastcbm.files import check_output_dir
    from fastcbm.precompute import PrecomputeConfig, precompute

    if args.features_layer and not args.features:
        raise InvalidArgument("--features-layer needs --features BACKBONE")
    if args.features_random_init and not args.features:
        raise InvalidArgument("--features-random-init needs --features BACKBONE")
    if args.cefam_layers and not args.cefam_classifier:
        raise InvalidArgument("--cefam-layers needs --cefam-classifier NAME")
    if args.no_prompts:
        args.grid = 0
    if args.grid < 0:
        raise InvalidArgument(f"--grid must be >= 0 (0: no ring prompts), got {args.grid}")
    cefam_layers = [s.strip() for s in args.cefam_layers.split(",") if s.strip()] if args.cefam_layers else None
    config = PrecomputeConfig.from_settings(
        grid=args.grid, radius=args.radius, width=args.width, centers=args.centers, batch_size=args.batch_size,
        shard_size=args.shard_size, device=args.device, dtype=args.dtype, num_workers=args.num_workers,
        loader=args.loader, max_encode_batch=args.max_encode_batch, features=args.features,
        features_pretrained=False if args.features_random_init else True, features_layer=args.features_layer,
        draft=args.jpeg_draft, verify=args.verify, cefam_classifier=args.cefam_classifier, cefam_layers=cefam_layers,
        cefam_pretrained=None if args.cefam_random_init else True, progress=not args.no_progress, engine=args.engine)
    config.validate()  # bad combinations: one line before loading any model
    check_output_dir(args.out, "--out")  # an existing file, an unwritable folder: one line before loading models
    # OSErrors (a full disk, a read-only folder, another writer's lock) are the CLI's: one line, exit 3
    reader = precompute(args.data, args.model, args.out, config, pretrained=args.pretrained)
    m = reader.manifest
    print(f"cache {args.out}: {m['num_images']} images x {reader.num_prompts} prompts x {reader.dim} dims "
          f"({m['num_skipped']} skipped) in {len(m['shards'])} shards")
    return 0


def run_similarities(args: argparse.Namespace) -> int:
    import torch

    from fastcbm.cache import CacheReader, write_similarities
    from fastcbm.concepts import encode_texts, load_concepts
    from fastcbm.models import load_clip

    from fastcbm.cache import CacheCorruptError
    from fastcbm.files import check_output_dir

    if args.chunk < 1:
        raise InvalidArgument(f"--chunk must be >= 1, got {args.chunk}")
    check_output_dir(args.out, "--out")
    reader = CacheReader(args.cache)
    if args.verify:
        problems = reader.verify()
        if problems:
            raise CacheCorruptError(f"--cache {args.cache} is damaged: {len(problems)} problem(s), first: "
                                    f"{problems[0]}")
    cached = reader.settings["model"]
    if (cached.get("name"), cached.get("pretrained")) != (args.model, args.pretrained):
        raise InvalidArgument(f"--model/--pretrained: the cache was made with model {cached.get('name')!r} pretrained "
                              f"{cached.get('pretrained')!r}, not {args.model!r} {args.pretrained!r}: its embeddings "
                              "live in another space")
    if "{}" not in args.template:
        raise InvalidArgument(f"--template must contain '{{}}', got {args.template!r}")
    concepts = list(load_concepts(args.concepts))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _, tokenizer = load_clip(args.model, args.pretrained)
    model = model.eval().to(device)
    text = encode_texts(model, tokenizer, concepts, templates=(args.template,), device=device,
                        progress=not getattr(args, "no_progress", False))
    index = write_similarities(reader, text, args.out, concepts=concepts, chunk=args.chunk, dtype=args.dtype,
                               device=device)
    print(f"wrote P [{index['num_images']}, {index['num_prompts']}, {index['num_concepts']}] {args.dtype} in "
          f"{len(index['chunks'])} chunk(s) to {args.out}")
    return 0
