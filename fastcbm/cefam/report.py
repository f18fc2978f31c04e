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
    DISPLAY_SIZE,
    ZERO_SHOWN,
    bar_cell,
    bar_legend,
    bar_scale,
    check_images,
    display_scale,
    esc,
    fmt,
    img_tag,
    overlay,
    page_html,
    png_data_uri,
    signed,
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
    return "".join(blocks) + _above_one_note(methods) + (f'<p class="muted">{esc(note)}</p>' if note else "")


def _above_one_note(methods: list[tuple[str, Mapping[str, Any]]]) -> str:
    """A line naming the ``nra_paper`` values above 1, which a reader of a normalised score would take for an error:
    the paper's form thresholds at the top p % of pixels with ties included, so a region can hold more pixels than
    the rank it is scored against (a map whose mask pixels share the top value, the rest distinct, scores 1.245 on
    256 pixels); ``nra`` (exact ranks) stays ≤ 1."""
    over = []
    for title, res in methods:
        rows = [*res.get("per_type", {}).items(), ("mean", res.get("mean", {}))]
        over += [f"{t} {fmt(v['nra_paper'])} ({title})" for t, v in rows
                 if isinstance(v.get("nra_paper"), (int, float)) and v["nra_paper"] > 1]
    if not over:
        return ""
    return (f'<p class="muted">nra_paper above 1: {esc("; ".join(over))}. nra_paper is the published formula (the top '
            "p % of pixels as the region, tied values included, so a region can be larger than the rank it is "
            "compared with); it is not bounded by 1, nra (exact ranks) is.</p>")


def _card_html(i: int, image: np.ndarray, e: Any, class_names: Sequence[str], scale: float) -> str:
    """One image's card: image, prediction, top concepts (score, stage, contribution bar on the page's ``scale``),
    their regions."""
    size = image.shape[-1]
    scale_px = display_scale(size)
    hwc = to_hwc(image)
    pred = int(e.predicted)
    name = e.class_name or (class_names[pred] if pred < len(class_names) else str(pred))
    prob = float(e.probabilities[pred])
    regions = _regions(i, e)
    rows, heats = [], []
    for j, c in enumerate(e.concepts):
        rows.append(f'<tr><td class="cname">{esc(c.concept)}</td><td class="num">{c.score:.2f}</td>'
                    f"<td>{esc(c.layer)}</td>{bar_cell(c.contribution, scale)}"
                    f'<td class="num val">{signed(c.contribution)}</td></tr>')
        if regions is not None:
            uri = png_data_uri(overlay(hwc, regions[j]), max(1, scale_px // 2))
            heats.append(f'<figure>{img_tag(uri, f"region of {c.concept}", width=DISPLAY_SIZE // 2)}'
                         f'<figcaption>{esc(c.concept)} ({esc(c.layer)})</figcaption></figure>')
    table = ('<table class="contrib"><tr><th>concept</th><th>score</th><th>stage</th><th>contribution</th><th></th>'
             "</tr>" + "".join(rows) + "</table>") if rows else '<p class="note">No concepts.</p>'
    return (f'<div class="card"><div class="head">'
            f'{img_tag(png_data_uri(hwc, scale_px), f"image {i}", "main", width=DISPLAY_SIZE)}'
            f'<div class="pred"><div class="muted">#{i}</div><div class="cls">{esc(name)} '
            f'<span class="prob">{prob:.1%}</span></div>{table}</div></div>'
            f'<div class="heats">{"".join(heats)}</div></div>')


def _regions(i: int, e: Any) -> np.ndarray | None:
    """``explanations[i].regions`` as ``[k, H, W]`` numpy (k = its concepts), or None."""
    if e.regions is None:
        return None
    regions = to_numpy(e.regions, f"explanations[{i}].regions")
    if regions.ndim != 3 or regions.shape[0] != len(e.concepts):
        raise InvalidArgument(f"explanations[{i}].regions must be [k, H, W] with k = {len(e.concepts)} concepts, got "
                              f"shape {tuple(regions.shape)}")
    return regions


def _contributions_note(values: list[float]) -> str:
    """A line when every contribution on the page would print as ±0.000: the page-wide bar scale then magnifies
    values close to zero, and the reader is told so in numbers."""
    if not values or any(abs(v) >= ZERO_SHOWN for v in values):
        return ""
    zeros = sum(v == 0.0 for v in values)
    return (f'<p class="note">Every contribution on this page is below {ZERO_SHOWN:g} in size ({zeros} of '
            f"{len(values)} exactly 0): the bars compare values that are all close to zero.</p>")


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
    for i, e in enumerate(explanations):  # validate everything before drawing
        _regions(i, e)
    values = [float(c.contribution) for e in explanations for c in e.concepts]
    scale = bar_scale(values)
    cards = "".join(_card_html(i, imgs[i], e, list(class_names), scale) for i, e in enumerate(explanations))
    sections = [f"<h2>Summary</h2>{summary_html(summary)}"]
    if evaluation is not None:
        sections.append(f"<h2>Concept localisation</h2>{_eval_html(evaluation)}")
    sections.append(f"<h2>Explanations ({n} image{'s' if n != 1 else ''})</h2>"
                    '<p class="muted">Top concepts by concept score S = s·cos(h, t) + b; stage = argmax of the layer '
                    "association; bars: contribution to the predicted class (green: for, red: against); regions: "
                    "Grad-CAM of the concept score at that stage, min-max normalised for display.</p>"
                    + ((bar_legend(values) + _contributions_note(values) + f'<div class="cards">{cards}</div>') if n
                       else '<p class="note">No images were explained.</p>'))
    if comparisons is not None:
        sections.append(f"<h2>Regions against the ground truth</h2>{_comparison_html(comparisons)}")
    return write_page(Path(path), page_html(title, "".join(sections), _EXTRACSS))


__all__ = ["write_cefam_report"]
