"""Explain a whole folder of images with a SALF-CBM (``fastcbm explain --model DIR FOLDER --out OUT``).

Writes, for the N readable images (in ``files.txt`` order):

    maps.npy                  float32 [N, S, S]  class-evidence heatmap of the predicted class (what
                                                 ``fastcbm metrics --maps`` and zero-shot segmentation read)
    contributions.npy         float32 [N, M]     per-concept contribution to the predicted class's logit
    concepts.npy              float32 [N, M]     standardised pooled concept activations
    concept_maps.npy          float32 [N, M, Gy, Gx] raw concept maps at the prompt grid
    explanations.safetensors  all of the above plus ``predicted`` int64 [N] and ``probabilities`` [N, K]
    predictions.json          per image: file, predicted class, probability, top concepts
    explanations.html         one page: the first ``html_images`` images with heatmaps, plus the class rules
    files.txt                 the image paths, one per line (skipped unreadable files are listed in the JSON)

Arrays are written batch by batch into memory-mapped ``.npy`` files, so a large folder never sits in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastcbm.salf.model import SALFCBM
from fastcbm.errors import InvalidArgument
from fastcbm.models.inputs import normalize_uint8


@torch.no_grad()
def explain_folder(model: SALFCBM, backbone, data: str | os.PathLike, out: str | os.PathLike, *, top_k: int = 5,
                   batch_size: int = 32, html_images: int = 24, device: str | torch.device = "cpu",
                   progress: bool = True) -> dict:
    """Explain every image of ``data`` (a folder, recursive, or a list file) into ``out``; returns a summary."""
    from fastcbm.data.folder import BadImageError, decode_image, list_images
    from fastcbm.salf.report import write_salf_report
    from fastcbm.salf import explain as ex

    files = list_images(data)
    size = int(backbone.input_size)
    good, images, skipped = [], [], []
    for f in files:  # decode once up front to know N (uint8 at the model's size: 12 KB per 64-px image)
        try:
            images.append(decode_image(f, size))
            good.append(f)
        except BadImageError as exc:
            skipped.append(f"{f}: {exc}")
    if not good:
        raise InvalidArgument(f"{data}: no readable image")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n, m, (gy, gx) = len(good), len(model.config.concepts), model.config.grid
    k_cls = model.head.num_classes
    arrays = {
        "maps": np.lib.format.open_memmap(out / "maps.npy", "w+", np.float32, (n, size, size)),
        "contributions": np.lib.format.open_memmap(out / "contributions.npy", "w+", np.float32, (n, m)),
        "concepts": np.lib.format.open_memmap(out / "concepts.npy", "w+", np.float32, (n, m)),
        "concept_maps": np.lib.format.open_memmap(out / "concept_maps.npy", "w+", np.float32, (n, m, gy, gx)),
    }
    predicted = np.zeros(n, np.int64)
    probabilities = np.zeros((n, k_cls), np.float32)
    names, classes = model.config.concepts, model.config.class_names
    records, report_expl = [], []
    for s in tqdm(range(0, n, batch_size), desc="explain", disable=not progress, leave=False):
        x = normalize_uint8(torch.stack(images[s:s + batch_size]), backbone.mean, backbone.std, device=device)
        maps = model.concept_maps(x)
        concepts = model.concepts_from_maps(maps)
        logits = model.classify(concepts)
        pred = logits.argmax(1)
        contrib = ex.contributions(model, concepts, pred)
        heat = ex.class_heatmap(model, x, target=pred)
        e = s + len(x)
        arrays["maps"][s:e] = heat.cpu().numpy()
        arrays["contributions"][s:e] = contrib.cpu().numpy()
        arrays["concepts"][s:e] = concepts.cpu().numpy()
        arrays["concept_maps"][s:e] = maps.cpu().numpy()
        predicted[s:e] = pred.cpu().numpy()
        probabilities[s:e] = torch.softmax(logits, 1).cpu().numpy()
        for i in range(len(x)):
            top = contrib[i].topk(min(top_k, m)).indices.tolist()
            records.append({"file": good[s + i], "predicted": classes[int(pred[i])] if classes else int(pred[i]),
                            "probability": round(float(probabilities[s + i, int(pred[i])]), 4),
                            "top_concepts": [{"concept": names[j], "contribution": round(float(contrib[i, j]), 4),
                                              "activation": round(float(concepts[i, j]), 4)} for j in top]})
        if len(report_expl) < html_images:
            report_expl += ex.explain(model, x[:html_images - len(report_expl)], top_k=top_k)
    for a in arrays.values():
        a.flush()
    from safetensors.numpy import save_file

    save_file({**{k: np.ascontiguousarray(v) for k, v in arrays.items()}, "predicted": predicted,
               "probabilities": probabilities}, str(out / "explanations.safetensors"))
    del arrays
    (out / "files.txt").write_text("".join(f + "\n" for f in good))
    summary = {"images": n, "skipped": skipped, "out": str(out), "concepts": m, "classes": k_cls,
               "files": {k: str(out / f) for k, f in (("maps", "maps.npy"), ("contributions", "contributions.npy"),
                                                      ("safetensors", "explanations.safetensors"),
                                                      ("html", "explanations.html"))}}
    (out / "predictions.json").write_text(json.dumps({"summary": summary, "images": records}, indent=1))
    n_html = len(report_expl)
    counts = np.bincount(predicted, minlength=k_cls)
    write_salf_report(out / "explanations.html", images=torch.stack(images[:n_html]), explanations=report_expl,
                      rules=ex.decision_rules(model),
                      summary={"images explained": n, "images shown": n_html, "unreadable images skipped": len(skipped),
                               "predictions": ", ".join(f"{classes[c] if classes else c}: {int(counts[c])}"
                                                        for c in np.argsort(-counts) if counts[c])},
                      class_names=classes)
    return summary


__all__ = ["explain_folder"]
