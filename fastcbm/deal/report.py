"""Self-contained HTML page of ``fastcbm deal demo``: the metrics of each model side by side and one image's concept
maps from each model (one row per model: the image, the category map, then the K concept maps); ``fastcbm deal
explain`` writes the same page for one model without metrics.

Built from :mod:`fastcbm.html`'s helpers (inline base64 PNGs, jet overlays, atomic write); no external files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcbm.errors import InvalidArgument
from fastcbm.html import (
    check_images,
    display_scale,
    esc,
    fmt,
    img_tag,
    overlay,
    page_html,
    png_data_uri,
    to_hwc,
    to_numpy,
    write_page,
)

METRIC_ROWS = (
    ("disentanglability", "disentanglability σ(10·(0.2 − R̄sep/100)) ↑"),
    ("mean_separation", "mean separation R̄sep ↓"),
    ("localizability", "localizability (insertion fidelity, 5 steps) ↑"),
    ("insertion_auc", "insertion curve AUC ↑"),
    ("concept_accuracy", "accuracy with concepts (eq. 6) ↑"),
    ("zero_shot_accuracy", "zero-shot accuracy ↑"),
    ("part_miou", "part mIoU of concept maps ↑"),
)


MIN_MAP_PX = 96  # narrowest on-page map; a table that cannot fit its maps at this width scrolls in its own box
LABEL_COL_PX = 104  # the model-name column at least ("plain", "deal" in bold)
FITS_PX = 1180  # the table's width at a 1,280-px window (24-px page margins, a scrollbar)


def _maps_table(hwc: np.ndarray, scale: int, maps: Mapping[str, Any], texts: Sequence[str]) -> str:
    """One row per model: the image, then its K+1 maps. Columns share the page width (fixed table layout), maps keep
    their aspect ratio and shrink to fit; below ``MIN_MAP_PX`` a map the table scrolls sideways inside its own box,
    with a line saying so (the page itself never gets wider than the window)."""
    cols = 1 + len(texts)
    header = "".join(f"<th>{esc(t)}</th>" for t in ["image", *texts])
    side = hwc.shape[0] * scale
    rows = []
    for name, m in maps.items():
        a = to_numpy(m, f"maps[{name!r}]").astype(np.float32)
        if a.ndim != 3 or a.shape[0] != len(texts):
            raise InvalidArgument(f"maps[{name!r}] must be [K+1, h, w] with K+1 = {len(texts)}, got {tuple(a.shape)}")
        cells = [f"<td>{img_tag(png_data_uri(hwc, scale), 'image', width=side)}</td>"]
        cells += [f"<td>{img_tag(png_data_uri(overlay(hwc, a[j]), scale), f'{name}: {texts[j]}', width=side)}</td>"
                  for j in range(a.shape[0])]
        rows.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>")
    # the model-name column grows with the longest name (~9 px a bold character), up to 240 px; longer names wrap
    label_px = min(240, max(LABEL_COL_PX, 20 + 9 * max((len(str(n)) for n in maps), default=0)))
    min_width = label_px + cols * (MIN_MAP_PX + 18)  # + cell padding (2 × 8 px) and border
    cue = (f'<p class="muted scroll-cue">{cols} columns: the table scrolls sideways in its box (⇆).</p>'
           if min_width > FITS_PX else "")
    return (f'{cue}<div class="scrollx"><table class="summary maps" style="min-width:{min_width}px">'
            f'<colgroup><col style="width:{label_px}px"><col span="{cols}"></colgroup>'
            f'<tr><th>model</th>{header}</tr>{"".join(rows)}</table></div>')


def _metrics_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    models = list(results)
    head = "".join(f"<th>{esc(m)}</th>" for m in models)
    rows = []
    for key, label in METRIC_ROWS:
        if not any(key in results[m] for m in models):
            continue
        cells = "".join(f"<td>{esc(fmt(results[m].get(key, '')))}</td>" for m in models)
        rows.append(f"<tr><th>{esc(label)}</th>{cells}</tr>")
    return f'<table class="summary"><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'


def write_deal_report(path: str | os.PathLike, *, image: torch.Tensor | np.ndarray,
                      maps: Mapping[str, torch.Tensor | np.ndarray], texts: Sequence[str],
                      results: Mapping[str, Mapping[str, Any]] | None = None,
                      summary: Mapping[str, Any] | None = None,
                      title: str = "fastcbm DEAL demo") -> Path:
    """Write the page and return its path.

    image: uint8 ``[3, S, S]`` (raw pixels); maps: model name → float ``[K+1, h, w]`` (row 0 the category; resized
    bilinearly for display); texts: the K+1 texts the maps explain; results: model name → metrics dict (as
    :func:`fastcbm.deal.evaluate.evaluate` returns; None or empty: no metrics section, as ``fastcbm deal explain``'s
    page of one image); summary: extra name → value rows (settings, timings).
    """
    img = check_images(to_numpy(image, "image")[None], "image")[0]
    if not maps:
        raise InvalidArgument("maps: no model's maps to show")
    table = _maps_table(to_hwc(img), display_scale(img.shape[-1]), maps, texts)
    extra = ""
    if summary:
        extra = "<h2>Run</h2><table class=\"summary\">" + "".join(
            f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in summary.items()) + "</table>"
    body = (
        f"{f'<h2>Metrics</h2>{_metrics_table(results)}' if results else ''}"
        "<h2>Concept maps of one image</h2>"
        '<p class="muted">Row 0 of each model: the category; then its concepts. Each map is min-max normalised '
        "and overlaid (jet: red = high).</p>"
        f"{table}{extra}"
    )
    return write_page(Path(path), page_html(title, body))


__all__ = ["write_deal_report"]
