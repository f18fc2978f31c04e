"""Explanations served from an exported graph (``fastcbm explain --engine FILE IMAGE``): the same prediction, top
concepts and heatmaps as :func:`fastcbm.salf.explain.explain`, computed from the graph's four outputs, labelled with
the names its metadata carries (no model folder needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile


def prepare_images(images_u8: torch.Tensor, meta: dict) -> np.ndarray:
    """uint8 ``[N, 3, S, S]`` → the array the graph takes (uint8, float 0..1, or normalised float32)."""
    kind = meta["input"]["dtype"]
    if kind == "uint8":
        return images_u8.contiguous().numpy()
    if kind == "normalized":
        from fastcbm.models.inputs import normalize_uint8

        return normalize_uint8(images_u8, meta["input"]["mean"], meta["input"]["std"]).contiguous().numpy()
    return images_u8.float().div(255).contiguous().numpy()


def explanations_from_outputs(outputs: dict, meta: dict, image_size: int, top_k: int = 5) -> list:
    """:class:`fastcbm.salf.explain.Explanation` per image from a runner's ``logits``, ``concepts``,
    ``concept_maps`` and ``contributions`` (top-k concepts by contribution to the predicted class, their maps
    upsampled bilinearly to ``image_size``)."""
    from fastcbm.salf.explain import Explanation, upsample

    missing = [n for n in ("logits", "concepts", "concept_maps", "contributions") if n not in outputs]
    if missing:
        raise InvalidArgument(f"the graph has no {missing} output(s): export it with every output to explain with it")
    t = {n: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v.cpu()) for n, v in outputs.items()}
    logits, concepts, maps, contrib = t["logits"], t["concepts"], t["concept_maps"], t["contributions"]
    names, classes = meta.get("concepts") or [], meta.get("class_names") or []
    k = min(top_k, contrib.shape[1])
    top = contrib.topk(k, dim=1).indices
    up = upsample(maps.gather(1, top[:, :, None, None].expand(-1, -1, *maps.shape[-2:])), image_size)
    out = []
    for i in range(logits.shape[0]):
        y = int(logits[i].argmax())
        out.append(Explanation(
            predicted=y, class_name=classes[y] if classes else None,
            probabilities=torch.softmax(logits[i], 0),
            contributions=contrib[i],
            top_concepts=[(names[j] if names else str(j), float(contrib[i, j]), float(concepts[i, j]))
                          for j in top[i].tolist()],
            top_indices=top[i], heatmaps=up[i]))
    return out


def explain_image(engine: str | Path, image: str | Path, *, top_k: int = 5, backend: str = "auto",
                  device: str | None = None) -> tuple[Any, torch.Tensor, dict]:
    """``(Explanation, uint8 image [3, S, S], metadata)`` for one image file, from an exported graph or engine."""
    from fastcbm.data.folder import BadImageError, decode_image
    from fastcbm.deploy.runtime import load

    runner = load(engine, backend=backend, device=device)
    meta = runner.metadata
    if meta.get("kind") != "salf":
        raise InvalidFile(f"--engine {engine}: a {meta.get('kind')!r} graph, not an exported SALF-CBM")
    try:
        img = decode_image(image, runner.input_size)
    except BadImageError as exc:
        raise InvalidArgument(f"image {image}: {exc}") from None
    outs = runner(prepare_images(img[None], meta))
    (explanation,) = explanations_from_outputs(outs, meta, runner.input_size, top_k)
    return explanation, img, dict(meta, backend=runner.backend)


def run_explain_engine(args) -> int:
    """``fastcbm explain --engine FILE IMAGE [--top-k K] [--html H] [--backend B]``: prints the same JSON as the
    model-folder path (plus the backend that ran it)."""
    import json

    if args.top_k < 1:
        raise InvalidArgument(f"--top-k must be >= 1, got {args.top_k}")
    if Path(args.image).is_dir():
        raise InvalidArgument(f"--engine explains one image file; {args.image} is a folder (use --model DIR --out DIR)")
    if not Path(args.image).is_file():
        raise MissingFile(f"image {args.image} not found")
    if getattr(args, "region", None):
        raise InvalidArgument("--region needs --model DIR (region scores use the model's concept statistics)")
    if getattr(args, "method", "salf") != "salf":
        raise InvalidArgument(f"--engine serves SALF-CBM graphs, not --method {args.method}")
    from fastcbm.deploy.tensorrt import TensorRTUnavailableError

    try:
        explanation, image, meta = explain_image(args.engine, args.image, top_k=args.top_k,
                                                 backend=getattr(args, "backend", "auto") or "auto")
    except TensorRTUnavailableError as exc:  # an .engine file (or --backend tensorrt) where TensorRT cannot run
        raise InvalidArgument(f"--engine {args.engine}: {exc}") from None
    result = {
        "image": str(args.image),
        "engine": str(args.engine),
        "backend": meta["backend"],
        "predicted": explanation.class_name or explanation.predicted,
        "probability": round(float(explanation.probabilities[explanation.predicted]), 4),
        "top_concepts": [{"concept": n, "contribution": round(c, 4), "activation": round(a, 4)}
                         for n, c, a in explanation.top_concepts],
    }
    if getattr(args, "html", None):
        from fastcbm.salf.report import write_salf_report

        write_salf_report(args.html, images=image[None], explanations=[explanation], rules={},
                          summary={"image": str(args.image), "engine": str(args.engine)},
                          class_names=meta.get("class_names") or [])
        result["html"] = str(args.html)
    print(json.dumps(result, indent=2))
    return 0
