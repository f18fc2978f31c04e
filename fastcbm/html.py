"""The HTML building blocks every explanation page shares (SALF-CBM, CE-FAM and DEAL reports).

Pages are one self-contained ``.html`` file: no external CSS or JS, every picture an inline base64 PNG, one style
sheet (:data:`CSS`). matplotlib is imported lazily (colormaps) through its Agg canvas only: the global pyplot backend of
the calling process is never switched. :func:`write_page` writes a page atomically.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastcbm.errors import InvalidArgument
from fastcbm.files import atomic_write_text

HEATMAP_CMAP = "jet"  # heatmap overlays (the usual CAM colormap)
OVERLAY_ALPHA = 0.5  # weight of the colormapped heatmap in the blend
DISPLAY_SIZE = 256  # target on-page size of the main image (px); small images are upscaled ×4 at most


def matplotlib_parts():
    """Import matplotlib lazily with a clear message (it is not a core dependency)."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is installed where the report is used
        raise ImportError("the HTML report needs matplotlib: pip install matplotlib") from e
    return matplotlib, Figure, FigureCanvasAgg


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Tensor / array / nested list → numpy array (on CPU, detached)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001 - report which argument was bad
        raise InvalidArgument(f"{name}: cannot convert {type(x).__name__} to an array ({e})") from None


def check_images(x: Any, name: str, n: int | None = None) -> np.ndarray:
    """Validate uint8 images ``[n, 3, S, S]`` and return them as a numpy array."""
    a = to_numpy(x, name)
    if a.ndim != 4 or a.shape[1] != 3 or a.shape[2] != a.shape[3]:
        raise InvalidArgument(f"{name} must be uint8 [n, 3, S, S], got shape {tuple(a.shape)}")
    if a.dtype != np.uint8:
        raise InvalidArgument(f"{name} must be uint8 [n, 3, S, S], got dtype {a.dtype}")
    if n is not None and a.shape[0] != n:
        raise InvalidArgument(f"{name} has {a.shape[0]} images, expected {n}")
    return a


def display_scale(size: int) -> int:
    """Integer nearest-neighbour upscale factor for an image of side ``size`` (×4 for 64 px, ×1 from 256 px)."""
    return max(1, min(4, DISPLAY_SIZE // max(size, 1)))


def png_data_uri(rgb: np.ndarray, scale: int = 1) -> str:
    """``[H, W, 3]`` (or ``[H, W]``) uint8 → ``data:image/png;base64,...``, upscaled ×scale with nearest neighbour."""
    img = Image.fromarray(np.ascontiguousarray(rgb))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # optimize=True: 10× slower, same size
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_hwc(image_chw: np.ndarray) -> np.ndarray:
    """``[3, S, S]`` → ``[S, S, 3]``."""
    return np.ascontiguousarray(image_chw.transpose(1, 2, 0))


def resize_map(m: np.ndarray, size: int) -> np.ndarray:
    """Float map ``[h, w]`` → ``[size, size]`` (bilinear, align_corners=False, like ``salf.explain.upsample``)."""
    m = np.asarray(m, dtype=np.float32)
    if m.shape == (size, size):
        return m
    t = torch.from_numpy(np.ascontiguousarray(m))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def minmax(m: np.ndarray) -> np.ndarray:
    """Min-max normalise a map ``[h, w]`` to [0, 1] (:func:`fastcbm.cam.minmax_normalize`); non-finite values count
    as 0 and a constant map becomes all zeros."""
    from fastcbm.cam.reference import minmax_normalize

    m = np.nan_to_num(np.asarray(m, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return minmax_normalize(torch.from_numpy(np.ascontiguousarray(m))).numpy()


def overlay(image_hwc: np.ndarray, heat: np.ndarray, cmap_name: str = HEATMAP_CMAP,
             alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Alpha-blend a min-max normalised, colormapped heatmap ``[h, w]`` onto an image ``[S, S, 3]`` → uint8."""
    mpl, _, _ = matplotlib_parts()
    heat = minmax(resize_map(heat, image_hwc.shape[0]))
    colored = mpl.colormaps[cmap_name](heat)[..., :3] * 255.0  # [S, S, 3] float
    out = (1.0 - alpha) * image_hwc.astype(np.float32) + alpha * colored
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def fmt(v: Any) -> str:
    """A summary / table value as short text (floats to 4 significant digits)."""
    if isinstance(v, (torch.Tensor, np.ndarray)) and np.size(v) == 1:
        v = v.item()
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


ZERO_SHOWN = 5e-4  # |value| below this prints as +0.000 with three decimals


def signed(v: float) -> str:
    """A contribution as text: three decimals with a sign (``+0.902``); exactly 0 as ``0``; a value that three
    decimals would print as ±0.000 in scientific form (``+3.2e-05``), so a tiny number never reads as zero."""
    v = float(v)
    if v == 0.0 or not math.isfinite(v):
        return "0" if v == 0.0 else str(v)
    return f"{v:+.3f}" if abs(v) >= ZERO_SHOWN else f"{v:+.1e}"


def bar_scale(values: Any) -> float:
    """The page's bar scale: the largest finite |value| of every bar drawn on the page (1.0 when all are 0), so
    bar lengths compare across images (+0.007 is a sliver next to +0.7, wherever each is shown)."""
    a = np.abs(np.asarray([float(v) for v in values], dtype=np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size and a.max() > 0 else 1.0


def bar_cell(v: float, scale: float) -> str:
    """A ``<td>`` with a horizontal bar ``|v| / scale`` of the cell's width (green ≥ 0, red < 0); ``data-v`` holds the
    value and ``data-scale`` the page's scale, which the browser test reads to check lengths against values."""
    v = float(v)
    width = 100.0 * min(abs(v) / scale, 1.0) if math.isfinite(v) else 0.0
    return (f'<td class="barcell"><div class="track"><div class="bar {"pos" if v >= 0 else "neg"}" data-v="{v!r}" '
            f'data-scale="{scale!r}" style="width:{width:.2f}%"></div></div></td>')


def bar_legend(values: Any, what: str = "contribution") -> str:
    """One line naming the page's bar scale (:func:`bar_scale` of ``values``); none when no value is non-zero (there
    is no bar to read)."""
    a = np.abs(np.asarray([float(v) for v in values], dtype=np.float64))
    if not (np.isfinite(a) & (a > 0)).any():
        return ""
    scale = bar_scale(a)
    return (f'<p class="muted legend">Bars share one scale on this page: a full bar is {what} '
            f"{signed(scale).lstrip('+')} (the largest |{what}| shown).</p>")


def img_tag(uri: str, alt: str, css_class: str = "", width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    c = f' class="{css_class}"' if css_class else ""
    return f'<img{c} src="{uri}" alt="{esc(alt)}"{w}>'


def flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested summary dicts as ``parent · child`` rows, lists as comma-separated figures: a reader sees numbers,
    never a Python repr."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix} · {k}" if prefix else str(k).replace("_", " ")
        if isinstance(v, Mapping):
            out += flatten(v, key)
        elif isinstance(v, (list, tuple)) and all(not isinstance(x, (Mapping, list, tuple)) for x in v):
            out.append((key, ", ".join(fmt(x) for x in v)))
        else:
            out.append((key, v))
    return out


def summary_html(summary: Mapping[str, Any]) -> str:
    if not summary:
        return '<p class="note">No summary figures.</p>'
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in flatten(summary))
    return f'<table class="summary">{rows}</table>'


def page_html(title: str, body: str, extra_css: str = "") -> str:
    """A whole self-contained page: the shared style sheet (+ ``extra_css``), the escaped ``title`` as ``<title>`` and
    ``<h1>``, then ``body`` (already HTML) and the footer."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}{extra_css}</style></head><body><h1>{esc(title)}</h1>"
            f'{body}<p class="muted" style="margin-top:2em">Generated by fastcbm.</p></body></html>\n')


def write_page(path: str | os.PathLike, page: str) -> Path:
    """Write an HTML page atomically (parent folders created) and return its path."""
    return atomic_write_text(Path(path), page)


# Layout rules that keep pages readable at any width (checked in a browser by tests/test_pages_browser.py):
# images keep their aspect ratio (height:auto, never stretched by a flex row: align-items:flex-start, flex:none),
# words wrap between words and break only when one word alone is wider than its cell (break-word, not anywhere,
# which also shrinks a cell's minimum width and splits "checkered" into "checkere|d"), bars live in a fixed-width
# track so their lengths compare across the page, a card is as wide as its content (never past the page) so a long
# number never spills out of it (notes and file names are .fill: they wrap to the card's width instead of widening
# it), and a table wider than the page scrolls in its own box.
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}th,td{padding:3px 8px;text-align:left;vertical-align:top;overflow-wrap:break-word}
table.summary th{font-weight:600;background:#f0f0f0}table.summary td,table.summary th{border:1px solid #ddd}
.note{color:#777;font-style:italic}.muted{color:#888;font-size:.9em}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.cards{display:flex;flex-wrap:wrap;gap:16px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;max-width:100%;box-sizing:border-box}
.head{display:flex;gap:12px;align-items:flex-start}.pred{flex:1;min-width:260px}
.cls{font-size:1.15em;font-weight:600;margin:4px 0}.file{overflow-wrap:anywhere}
.fill{width:0;min-width:100%}
.prob{font-weight:400;color:#555}.ok{color:#1a7f37}.bad{color:#c62828}
img{image-rendering:pixelated;max-width:100%;height:auto}img.main{border:1px solid #ccc;flex:none}
.contrib{margin-top:6px}.cname{max-width:180px}
.barcell{width:120px}.track{width:120px}.bar{height:10px;border-radius:2px}
.bar.pos{background:#2e7d32}.bar.neg{background:#c62828}
.heats{display:flex;flex-wrap:wrap;gap:8px;margin-top:8px}
figure{margin:0;text-align:center}figcaption{font-size:.8em;max-width:128px;overflow-wrap:break-word}
.rule{display:inline-block;margin:1px 4px 1px 0;padding:0 4px;border-radius:3px;font-size:.9em}
.rule.pos{background:#e8f5e9}.rule.neg{background:#ffebee}
table.rules td,table.rules th{border-bottom:1px solid #eee}img.diagram{image-rendering:auto}
table.seg td{padding:2px}
.scrollx{overflow-x:auto;max-width:100%}
table.maps{table-layout:fixed;width:100%}table.maps img{display:block;width:100%}
"""
