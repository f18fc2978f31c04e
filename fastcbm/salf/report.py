"""Self-contained HTML report of a SALF-CBM's explanations (written at the end of ``fastcbm demo``).

One ``.html`` file, no external CSS/JS: every picture is an inline base64 PNG. Sections, top to bottom: the summary
table, one card per explained image (prediction, top-k concept contributions, concept heatmaps over the image), the
global decision rules (class × concept weight diagram + top rules per class) and, optionally, zero-shot segmentation
rows (image, ground-truth mask, SALF heatmap, Grad-CAM heatmap).

matplotlib is imported lazily (colormaps and the weight diagram) through its Agg canvas only: the global pyplot
backend of the calling process is never switched.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcbm.errors import InvalidArgument
from fastcbm.html import (
    CSS,
    DISPLAY_SIZE,
    check_images,
    display_scale,
    esc,
    img_tag,
    matplotlib_parts,
    overlay,
    png_data_uri,
    summary_html,
    to_hwc,
    to_numpy,
    write_page,
)

WEIGHTS_CMAP = "RdBu_r"  # diverging, centred at 0: red = positive weight, blue = negative
MAX_DIAGRAM_CONCEPTS = 60  # columns of the class-weight diagram (largest max|w| kept)
MAX_DIAGRAM_CLASSES = 50
RULES_PER_CLASS = 8  # rows of the text table per class


# ----------------------------------------------------------------------------------------------------------- helpers


# ---------------------------------------------------------------------------------------------------------- sections


def _check_explanation(e: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate one Explanation; return (probabilities [K], heatmaps [k, H, W]) as numpy."""
    name = f"explanations[{i}]"
    for attr in ("predicted", "probabilities", "top_concepts", "heatmaps"):
        if not hasattr(e, attr):
            raise InvalidArgument(f"{name} is not an Explanation (no {attr!r})")
    probs = to_numpy(e.probabilities, f"{name}.probabilities").astype(np.float64)
    if probs.ndim != 1 or probs.size == 0:
        raise InvalidArgument(f"{name}.probabilities must be [K], got shape {tuple(probs.shape)}")
    if not 0 <= int(e.predicted) < probs.size:
        raise InvalidArgument(f"{name}.predicted = {e.predicted} is out of range [0, {probs.size})")
    heat = to_numpy(e.heatmaps, f"{name}.heatmaps")
    if heat.ndim != 3:
        raise InvalidArgument(f"{name}.heatmaps must be [k, H, W], got shape {tuple(heat.shape)}")
    if heat.shape[0] != len(e.top_concepts):
        raise InvalidArgument(f"{name}.heatmaps has {heat.shape[0]} maps but top_concepts has {len(e.top_concepts)}")
    return probs, heat.astype(np.float32)


def _class_label(idx: int, class_names: Sequence[str]) -> str:
    return str(class_names[idx]) if 0 <= idx < len(class_names) else str(idx)


def _card_html(i: int, image: np.ndarray, e: Any, probs: np.ndarray, heat: np.ndarray,
               class_names: Sequence[str], label: int | None) -> str:
    """One image's card: image, prediction, top-k contributions as bars, heatmap overlays."""
    size = image.shape[-1]
    scale = display_scale(size)
    hwc = to_hwc(image)
    pred = int(e.predicted)
    pred_name = e.class_name if getattr(e, "class_name", None) else _class_label(pred, class_names)
    verdict = ""
    if label is not None:
        ok = label == pred
        verdict = (f' <span class="{"ok" if ok else "bad"}">{"✓" if ok else "✗"}</span>'
                   f' <span class="muted">true: {esc(_class_label(label, class_names))}</span>')
    others = np.argsort(-probs)[:3]
    runner = ", ".join(f"{esc(_class_label(int(j), class_names))} {probs[j]:.2f}" for j in others if j != pred)
    # contribution bars, scaled by the largest |contribution| shown on this card
    conts = [float(c) for _, c, _ in e.top_concepts]
    cmax = max((abs(c) for c in conts), default=0.0) or 1.0
    bars, heats = [], []
    # Evidence comes in three kinds: a present concept (standardised activation ≥ 0) with a positive weight, an
    # *absent* concept (activation < 0: below its training average) with a negative weight — the class is supported
    # because the concept is missing — and evidence against the class (negative contribution). Grouped apart, so
    # "striped +0.8" is never read as "stripes seen" when stripes were in fact absent.
    groups = {"present": [], "absent": [], "against": []}
    for j, (cname, c, act) in enumerate(e.top_concepts):
        kind = "against" if float(c) < 0 else ("absent" if float(act) < 0 else "present")
        groups[kind].append((j, cname, c, act))
    titles = {"present": "evidence from present concepts", "absent": "evidence from absent concepts "
              "(below average, negative weight)", "against": "evidence against"}
    for kind, rows in groups.items():
        if rows:
            bars.append(f'<tr class="group"><td colspan="4" class="muted">{esc(titles[kind])}</td></tr>')
        for j, cname, c, act in rows:
            width = 100.0 * abs(float(c)) / cmax
            sign = "pos" if float(c) >= 0 else "neg"
            label = f"no {cname}" if kind == "absent" else cname
            bars.append(
                f'<tr class="{kind}"><td class="cname">{esc(label)}</td>'
                f'<td class="barcell"><div class="bar {sign}" style="width:{width:.1f}%"></div></td>'
                f'<td class="num">{float(c):+.3f}</td><td class="num muted">{float(act):+.2f}</td></tr>')
    for j, (cname, c, act) in enumerate(e.top_concepts):
        uri = png_data_uri(overlay(hwc, heat[j]), max(1, scale // 2))  # heatmaps shown at half size
        heats.append(f'<figure>{img_tag(uri, f"heatmap of {cname}", width=DISPLAY_SIZE // 2)}'
                     f'<figcaption>{esc(cname)}</figcaption></figure>')
    bars_html = ('<table class="contrib"><tr><th>concept</th><th>contribution</th><th></th>'
                 '<th title="standardised activation">act.</th></tr>' + "".join(bars) + "</table>"
                 if bars else '<p class="note">No concepts.</p>')
    return (
        f'<div class="card"><div class="head">'
        f'{img_tag(png_data_uri(hwc, scale), f"image {i}", "main", width=DISPLAY_SIZE)}'
        f'<div class="pred"><div class="muted">#{i}</div>'
        f'<div class="cls">{esc(pred_name)} <span class="prob">{probs[pred]:.1%}</span>{verdict}</div>'
        f'<div class="muted">next: {runner or "—"}</div>{bars_html}</div></div>'
        f'<div class="heats">{"".join(heats)}</div></div>'
    )


def _rules_matrix(rules: Mapping[str, Sequence[tuple[str, float]]]) -> tuple[list[str], list[str], np.ndarray, int]:
    """rules → (classes, concepts, weights [classes, concepts], total concepts used).

    Concepts are ordered by the class where their |weight| is largest, then by decreasing |weight|, which makes the
    diagram roughly block-diagonal; beyond ``MAX_DIAGRAM_CONCEPTS`` the largest max|w| are kept."""
    classes = [str(c) for c in rules][:MAX_DIAGRAM_CLASSES]
    concepts: dict[str, int] = {}
    for c in classes:
        for name, _ in rules[c]:
            concepts.setdefault(str(name), len(concepts))
    w = np.zeros((len(classes), len(concepts)), dtype=np.float64)
    for r, c in enumerate(classes):
        for name, weight in rules[c]:
            w[r, concepts[str(name)]] = float(weight)
    names = list(concepts)
    total = len(names)
    if total > MAX_DIAGRAM_CONCEPTS:
        keep = np.sort(np.argsort(-np.abs(w).max(axis=0), kind="stable")[:MAX_DIAGRAM_CONCEPTS])
        w, names = w[:, keep], [names[k] for k in keep]
    if names:
        absw = np.abs(w)
        order = sorted(range(len(names)), key=lambda k: (int(absw[:, k].argmax()), -absw[:, k].max()))
        w, names = w[:, order], [names[k] for k in order]
    return classes, names, w, total


def _weights_png(classes: list[str], concepts: list[str], w: np.ndarray) -> str:
    """The class-weight diagram (classes × concepts, diverging colormap centred at 0) as a PNG data URI."""
    _, Figure, FigureCanvasAgg = matplotlib_parts()
    fig = Figure(figsize=(min(2.5 + 0.28 * len(concepts), 24), min(1.8 + 0.3 * len(classes), 18)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    vmax = float(np.abs(w).max()) or 1.0
    im = ax.imshow(w, cmap=WEIGHTS_CMAP, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(concepts)))
    ax.set_xticklabels(concepts, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)))
    ax.set_yticklabels(classes, fontsize=8)
    ax.set_xlabel("concept")
    ax.set_ylabel("class")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="head weight")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _rules_html(rules: Mapping[str, Sequence[tuple[str, float]]]) -> str:
    if not rules or not any(len(v) for v in rules.values()):
        return '<p class="note">No decision rules (the head has no non-zero weights).</p>'
    classes, concepts, w, total = _rules_matrix(rules)
    note = ""
    if total > len(concepts) or len(rules) > len(classes):
        note = (f'<p class="note">Diagram shows {len(classes)} of {len(rules)} classes and {len(concepts)} of '
                f'{total} concepts (largest weights).</p>')
    diagram = img_tag(_weights_png(classes, concepts, w), "class × concept weight diagram", "diagram")
    rows = []
    for c, lst in rules.items():
        top = sorted(lst, key=lambda t: -abs(float(t[1])))[:RULES_PER_CLASS]
        cells = " ".join(f'<span class="rule {"pos" if float(x) >= 0 else "neg"}">{esc(n)} {float(x):+.3f}</span>'
                         for n, x in top)
        more = f' <span class="muted">(+{len(lst) - len(top)} more)</span>' if len(lst) > len(top) else ""
        rows.append(f"<tr><th>{esc(c)}</th><td class=\"num\">{len(lst)}</td><td>{cells or '—'}{more}</td></tr>")
    table = ('<table class="rules"><tr><th>class</th><th>#w≠0</th><th>top rules (concept weight)</th></tr>'
             + "".join(rows) + "</table>")
    return f"{diagram}{note}{table}"


def _segmentation_html(seg: Mapping[str, Any]) -> str:
    missing = [k for k in ("images", "masks", "salf", "gradcam") if k not in seg]
    if missing:
        raise InvalidArgument(f"segmentation is missing {missing} (needs images, masks, salf, gradcam)")
    imgs = check_images(seg["images"], "segmentation['images']")
    n, s = imgs.shape[0], imgs.shape[-1]
    masks = to_numpy(seg["masks"], "segmentation['masks']")
    if masks.shape != (n, s, s):
        raise InvalidArgument(f"segmentation['masks'] must be bool [{n}, {s}, {s}], got shape {tuple(masks.shape)}")
    maps = {}
    for key in ("salf", "gradcam"):
        m = to_numpy(seg[key], f"segmentation[{key!r}]")
        if m.ndim != 3 or m.shape[0] != n:
            raise InvalidArgument(f"segmentation[{key!r}] must be float [{n}, H, W], got shape {tuple(m.shape)}")
        maps[key] = m.astype(np.float32)
    if n == 0:
        return '<p class="note">No segmentation samples.</p>'
    scale, half = max(1, display_scale(s) // 2), DISPLAY_SIZE // 2  # four pictures a row: half size
    rows = []
    for i in range(n):
        hwc = to_hwc(imgs[i])
        gt = np.where(masks[i].astype(bool), 255, 0).astype(np.uint8)
        cells = [img_tag(png_data_uri(hwc, scale), f"segmentation image {i}", width=half),
                 img_tag(png_data_uri(gt, scale), f"ground-truth mask {i}", width=half),
                 img_tag(png_data_uri(overlay(hwc, maps["salf"][i]), scale), f"SALF heatmap {i}", width=half),
                 img_tag(png_data_uri(overlay(hwc, maps["gradcam"][i]), scale), f"Grad-CAM {i}", width=half)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ('<table class="seg"><tr><th>image</th><th>ground truth</th><th>SALF-CBM</th><th>Grad-CAM</th></tr>'
            + "".join(rows) + "</table>")




# -------------------------------------------------------------------------------------------------------------- API


def write_salf_report(
    path: str | os.PathLike,
    *,
    images: torch.Tensor | np.ndarray | None,
    explanations: Sequence[Any],
    rules: Mapping[str, Sequence[tuple[str, float]]],
    summary: Mapping[str, Any],
    class_names: Sequence[str],
    labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    segmentation: Mapping[str, Any] | None = None,
    title: str = "fastcbm SALF-CBM report",
) -> Path:
    """Write a self-contained HTML report of a SALF-CBM and return its path.

    Args:
        path: the ``.html`` file to write (parent folders are created; written atomically).
        images: uint8 ``[n, 3, S, S]``, the images that were explained (raw pixels, not normalised). May be None or
            empty when ``explanations`` is empty.
        explanations: ``n`` :class:`~fastcbm.salf.explain.Explanation` (``probabilities [K]``, ``top_concepts`` k
            tuples, ``heatmaps [k, H, W]``; maps at another resolution than S are resized bilinearly).
        rules: class → [(concept, weight)], the non-zero head weights (``salf.explain.decision_rules``).
        summary: name → number or string, shown as a table at the top (floats to 4 significant digits).
        class_names: ``K`` class names (used for the true label and when an explanation has no class name).
        labels: optional true labels ``[n]`` (ints); each card then shows ✓ / ✗.
        segmentation: optional dict ``images`` uint8 ``[m, 3, S, S]``, ``masks`` bool ``[m, S, S]``, ``salf`` and
            ``gradcam`` float ``[m, H, W]``: one row per image (image, GT mask, SALF heatmap, Grad-CAM heatmap).
        title: page title (escaped).

    Raises:
        ValueError: a shape or length does not match; the message names the argument.
    """
    n = len(explanations)
    if images is None:
        if n:
            raise InvalidArgument(f"images is None but there are {n} explanations")
        imgs = np.zeros((0, 3, 1, 1), dtype=np.uint8)
    else:
        imgs = check_images(images, "images")
        if imgs.shape[0] != n:
            raise InvalidArgument(f"images has {imgs.shape[0]} images but explanations has {n}")
    labs: list[int] | None = None
    if labels is not None:
        la = to_numpy(labels, "labels")
        if la.ndim != 1 or la.shape[0] != n:
            raise InvalidArgument(f"labels must be [n] with n = {n}, got shape {tuple(la.shape)}")
        labs = [int(v) for v in la.tolist()]
    if not isinstance(rules, Mapping):
        raise InvalidArgument(f"rules must be a dict class → [(concept, weight)], got {type(rules).__name__}")
    if not isinstance(summary, Mapping):
        raise InvalidArgument(f"summary must be a dict name → value, got {type(summary).__name__}")
    class_names = [str(c) for c in class_names]
    checked = [_check_explanation(e, i) for i, e in enumerate(explanations)]  # validate everything before drawing

    if n:
        cards = "".join(_card_html(i, imgs[i], e, p, h, class_names, None if labs is None else labs[i])
                        for i, (e, (p, h)) in enumerate(zip(explanations, checked)))
        cards_html = f'<div class="cards">{cards}</div>'
    else:
        cards_html = '<p class="note">No images were explained.</p>'
    seg_html = ""
    if segmentation is not None:
        if not isinstance(segmentation, Mapping):
            raise InvalidArgument(f"segmentation must be a dict, got {type(segmentation).__name__}")
        seg_html = f"<h2>Zero-shot segmentation</h2>{_segmentation_html(segmentation)}"

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1>"
        f"<h2>Summary</h2>{summary_html(summary)}"
        f"<h2>Explanations ({n} image{'s' if n != 1 else ''})</h2>"
        '<p class="muted">Bars: contribution of each concept to the predicted class logit (green: for, red: against); '
        "act.: standardised concept activation. Heatmaps: where each concept is, min-max normalised.</p>"
        f"{cards_html}"
        f"<h2>Decision rules</h2>{_rules_html(rules)}"
        f"{seg_html}"
        '<p class="muted" style="margin-top:2em">Generated by fastcbm.</p></body></html>\n'
    )
    return write_page(path, page)
