"""Self-contained HTML page of CE-FAM explanations and evaluation (``fastcbm explain --method cefam --html``,
``fastcbm demo --method cefam``), built from :mod:`fastcbm.salf.report`'s helpers (inline PNGs, same style sheet).

Sections: summary table; the localisation evaluation (per concept type: CE-FAM by association top-1, the oracle,
CLIP-Dissect); one card per explained image (prediction, top concepts with score, chosen stage and contribution bars,
region overlays); optional comparison rows (image, ground-truth mask, CE-FAM region, CLIP-Dissect region).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastcbm.errors import InvalidArgument
from fastcbm.html import (
    CSS,
    DISPLAY_SIZE,
    check_images,
    display_scale,
    esc,
    fmt,
    img_tag,
    overlay,
    png_data_uri,
    summary_html,
    to_hwc,
    to_numpy,
    write_page,
)

_METRICS = ("nra", "nra_paper", "epg", "hit_rate")
_EXTRACSS = "table.eval td,table.eval th{border:1px solid #ddd}table.eval th{background:#f0f0f0}"


def _eval_html(evaluation: Mapping[str, Any]) -> str:
    """Tables per method: rows = concept types + mean, columns = metrics."""
    blocks = []
    methods = []
    cefam = evaluation.get("cefam", {})
    if "association_top1" in cefam:
        methods.append(("CE-FAM, stage by association (paper Table 2)", cefam["association_top1"]))
    if "oracle_best_layer" in cefam:
        methods.append(("CE-FAM, best stage — oracle (paper Table 1)", cefam["oracle_best_layer"]))
    if "clip_dissect" in evaluation:
        methods.append(("CLIP-Dissect baseline", evaluation["clip_dissect"]))
    if not methods:
        return '<p class="note">No evaluation.</p>'
    head = "<tr><th>concept type</th>" + "".join(f"<th>{esc(m)}</th>" for m in _METRICS) + "<th>pairs</th></tr>"
    for title, res in methods:
        rows = []
        for t, v in res.get("per_type", {}).items():
            rows.append(f"<tr><th>{esc(t)}</th>" + "".join(f'<td class="num">{esc(fmt(v.get(m)))}</td>'
                                                               for m in _METRICS)
                        + f'<td class="num">{esc(v.get("pairs", ""))}</td></tr>')
        mean = res.get("mean", {})
        rows.append("<tr><th>mean over types</th>" + "".join(f'<td class="num"><b>{esc(fmt(mean.get(m)))}</b></td>'
                                                             for m in _METRICS) + "<td></td></tr>")
        blocks.append(f"<h3>{esc(title)}</h3><table class=\"eval\">{head}{''.join(rows)}</table>")
    note = evaluation.get("note")
    return "".join(blocks) + (f'<p class="muted">{esc(note)}</p>' if note else "")


def _card_html(i: int, image: np.ndarray, e: Any, class_names: Sequence[str]) -> str:
    size = image.shape[-1]
    scale = display_scale(size)
    hwc = to_hwc(image)
    pred = int(e.predicted)
    name = e.class_name or (class_names[pred] if pred < len(class_names) else str(pred))
    prob = float(e.probabilities[pred])
    regions = to_numpy(e.regions, f"explanations[{i}].regions") if e.regions is not None else None
    if regions is not None and (regions.ndim != 3 or regions.shape[0] != len(e.concepts)):
        raise InvalidArgument(f"explanations[{i}].regions must be [k, H, W] with k = {len(e.concepts)} concepts, got "
                              f"shape {tuple(regions.shape)}")
    cmax = max((abs(c.contribution) for c in e.concepts), default=0.0) or 1.0
    rows, heats = [], []
    for j, c in enumerate(e.concepts):
        width = 100.0 * abs(c.contribution) / cmax
        sign = "pos" if c.contribution >= 0 else "neg"
        rows.append(f'<tr><td class="cname">{esc(c.concept)}</td><td class="num">{c.score:.2f}</td>'
                    f'<td>{esc(c.layer)}</td><td class="barcell"><div class="bar {sign}" style="width:{width:.1f}%">'
                    f'</div></td><td class="num">{c.contribution:+.3f}</td></tr>')
        if regions is not None:
            uri = png_data_uri(overlay(hwc, regions[j]), max(1, scale // 2))
            heats.append(f'<figure>{img_tag(uri, f"region of {c.concept}", width=DISPLAY_SIZE // 2)}'
                         f'<figcaption>{esc(c.concept)} ({esc(c.layer)})</figcaption></figure>')
    table = ('<table class="contrib"><tr><th>concept</th><th>score</th><th>stage</th><th>contribution</th><th></th>'
             "</tr>" + "".join(rows) + "</table>") if rows else '<p class="note">No concepts.</p>'
    return (f'<div class="card"><div class="head">'
            f'{img_tag(png_data_uri(hwc, scale), f"image {i}", "main", width=DISPLAY_SIZE)}'
            f'<div class="pred"><div class="muted">#{i}</div><div class="cls">{esc(name)} '
            f'<span class="prob">{prob:.1%}</span></div>{table}</div></div>'
            f'<div class="heats">{"".join(heats)}</div></div>')


def _comparison_html(cmp: Mapping[str, Any]) -> str:
    missing = [k for k in ("images", "masks", "concepts", "cefam", "clip_dissect") if k not in cmp]
    if missing:
        raise InvalidArgument(f"comparisons is missing {missing} (needs images, masks, concepts, cefam, clip_dissect)")
    imgs = check_images(cmp["images"], "comparisons['images']")
    n = imgs.shape[0]
    if len(cmp["concepts"]) != n:
        raise InvalidArgument(f"comparisons['concepts'] has {len(cmp['concepts'])} names for {n} images")
    masks = [to_numpy(m, "comparisons['masks']") for m in cmp["masks"]]
    maps = {k: [to_numpy(m, f"comparisons[{k!r}]").astype(np.float32) for m in cmp[k]] for k in ("cefam",
                                                                                                   "clip_dissect")}
    if len(masks) != n or any(len(v) != n for v in maps.values()):
        raise InvalidArgument(f"comparisons: masks, cefam and clip_dissect need {n} entries each")
    half = DISPLAY_SIZE // 2
    rows = []
    for i in range(n):
        hwc = to_hwc(imgs[i])
        s = hwc.shape[0]
        scale = max(1, display_scale(s) // 2)
        gt = np.where(masks[i].astype(bool), 255, 0).astype(np.uint8)
        cells = [img_tag(png_data_uri(hwc, scale), f"image {i}", width=half),
                 img_tag(png_data_uri(gt, max(1, scale * s // max(gt.shape[0], 1))), f"mask {i}", width=half),
                 img_tag(png_data_uri(overlay(hwc, maps["cefam"][i]), scale), f"CE-FAM {i}", width=half),
                 img_tag(png_data_uri(overlay(hwc, maps["clip_dissect"][i]), scale), f"CLIP-Dissect {i}",
                          width=half)]
        rows.append(f"<tr><th>{esc(cmp['concepts'][i])}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ('<table class="seg"><tr><th>concept</th><th>image</th><th>ground truth</th><th>CE-FAM</th>'
            "<th>CLIP-Dissect</th></tr>" + "".join(rows) + "</table>")


def write_cefam_report(path: str | os.PathLike, *, images, explanations: Sequence[Any], summary: Mapping[str, Any],
                       class_names: Sequence[str] = (), evaluation: Mapping[str, Any] | None = None,
                       comparisons: Mapping[str, Any] | None = None, title: str = "fastcbm CE-FAM report") -> Path:
    """Write the CE-FAM page and return its path.

    Args:
        images: uint8 ``[n, 3, S, S]`` (raw pixels) of the ``n`` explanations (may be empty with no explanations).
        explanations: :class:`~fastcbm.cefam.explain.CEFAMExplanation` per image.
        summary: name → value table at the top.
        evaluation: the dict of :func:`fastcbm.cefam.evaluate.evaluate_cefam` (optional).
        comparisons: optional ``images`` uint8 ``[m, 3, S, S]``, ``masks`` (m bool ``[H, W]``), ``concepts`` (m
            names), ``cefam`` and ``clip_dissect`` (m float maps): one row per (image, concept) pair.

    Raises:
        ValueError: a shape or length does not match; the message names the argument.
    """
    n = len(explanations)
    if n:
        imgs = check_images(images, "images", n)
    if not isinstance(summary, Mapping):
        raise InvalidArgument(f"summary must be a dict name → value, got {type(summary).__name__}")  # noqa: TRY004
    cards = "".join(_card_html(i, imgs[i], e, list(class_names)) for i, e in enumerate(explanations)) if n else ""
    sections = [f"<h2>Summary</h2>{summary_html(summary)}"]
    if evaluation is not None:
        sections.append(f"<h2>Concept localisation</h2>{_eval_html(evaluation)}")
    sections.append(f"<h2>Explanations ({n} image{'s' if n != 1 else ''})</h2>"
                    '<p class="muted">Top concepts by concept score S = s·cos(h, t) + b; stage = argmax of the layer '
                    "association; bars: contribution to the predicted class (green: for, red: against); regions: "
                    "Grad-CAM of the concept score at that stage, min-max normalised for display.</p>"
                    + (f'<div class="cards">{cards}</div>' if n else '<p class="note">No images were explained.</p>'))
    if comparisons is not None:
        sections.append(f"<h2>Regions against the ground truth</h2>{_comparison_html(comparisons)}")
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}{_EXTRACSS}</style></head><body><h1>{esc(title)}</h1>"
            + "".join(sections) + '<p class="muted" style="margin-top:2em">Generated by fastcbm.</p></body></html>\n')
    return write_page(Path(path), page)


__all__ = ["write_cefam_report"]
