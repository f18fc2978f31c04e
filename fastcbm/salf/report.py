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
    DISPLAY_SIZE,
    ZERO_SHOWN,
    bar_cell,
    bar_legend,
    bar_scale,
    check_images,
    display_scale,
    esc,
    img_tag,
    matplotlib_parts,
    overlay,
    page_html,
    png_data_uri,
    signed,
    summary_html,
    to_hwc,
    to_numpy,
    write_page,
)

WEIGHTS_CMAP = "RdBu_r"  # diverging, centred at 0: red = positive weight, blue = negative
MAX_DIAGRAM_CONCEPTS = 60  # columns of the class-weight diagram (largest max|w| kept)
MAX_DIAGRAM_CLASSES = 50
RULES_PER_CLASS = 8  # rows of the text table per class


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


def _shown_concepts(e: Any) -> list[tuple[int, str, float, float]]:
    """The rows a card shows: ``(j, name, contribution, activation)`` of the top concepts whose contribution does not
    print as zero. A sparse head gives most concepts weight 0 for a class, so top-k often ends in exact zeros
    (``-0.000`` for a below-average concept): they are not evidence, and the card says how many it leaves out."""
    return [(j, str(n), float(c), float(a)) for j, (n, c, a) in enumerate(e.top_concepts)
            if abs(float(c)) >= ZERO_SHOWN]


def _concept_label(name: str, act: float) -> str:
    """A concept as the card names it: ``no <name>`` when its standardised activation is below 0 (below its training
    average), so an absent concept is never read as a present one, in the bars and under its map alike."""
    return f"no {name}" if act < 0 else name


_GROUP_TITLES = {"present": "evidence from present concepts",
                 "absent": "evidence from absent concepts (below average, negative weight)",
                 "against": "evidence against"}


def _bars_html(rows: list[tuple[int, str, float, float]], hidden: int, scale: float) -> str:
    """The contribution table of one card, grouped: present concepts (activation ≥ 0) with a positive weight; absent
    concepts (activation < 0) with a negative weight (the class is supported because the concept is missing); evidence
    against the class (negative contribution, ``no <name>`` when the concept is absent). Grouped apart, so "striped
    +0.8" is never read as "stripes seen" when stripes were in fact absent."""
    groups: dict[str, list[tuple[int, str, float, float]]] = {"present": [], "absent": [], "against": []}
    for row in rows:
        _, _, c, act = row
        groups["against" if c < 0 else ("absent" if act < 0 else "present")].append(row)
    def note(css: str, text: str) -> str:  # a full-width line that wraps to the card instead of widening it
        return f'<tr class="{css}"><td colspan="4" class="muted"><div class="fill">{esc(text)}</div></td></tr>'

    out = []
    for kind, items in groups.items():
        if items:
            out.append(note("group", _GROUP_TITLES[kind]))
        for _, name, c, act in items:
            out.append(f'<tr class="{kind}"><td class="cname">{esc(_concept_label(name, act))}</td>{bar_cell(c, scale)}'
                       f'<td class="num val">{signed(c)}</td><td class="num muted">{act:+.2f}</td></tr>')
    if hidden:
        out.append(note("hidden", f"{hidden} more of the top concepts contribute 0.000 (no weight for this class, or "
                                  "an activation at its average): not shown"))
    if not rows and not hidden:
        return '<p class="note">No concepts.</p>'
    return ('<table class="contrib"><tr><th>concept</th><th>contribution</th><th></th>'
            '<th title="standardised activation">act.</th></tr>' + "".join(out) + "</table>")


def _card_html(i: int, image: np.ndarray, e: Any, probs: np.ndarray, heat: np.ndarray,
               class_names: Sequence[str], label: int | None, scale: float, file: str | None = None) -> str:
    """One image's card: image, prediction (✓/✗ against ``label``), contributions as bars on the page's ``scale``,
    the shown concepts' heatmaps over the image."""
    size = image.shape[-1]
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
    rows = _shown_concepts(e)
    heats = []
    for j, name, _, act in rows:
        uri = png_data_uri(overlay(hwc, heat[j]), max(1, display_scale(size) // 2))  # heatmaps shown at half size
        label_j = _concept_label(name, act)
        heats.append(f'<figure>{img_tag(uri, f"heatmap of {label_j}", width=DISPLAY_SIZE // 2)}'
                     f"<figcaption>{esc(label_j)}</figcaption></figure>")
    where = f" · {esc(_short_path(file))}" if file else ""
    return (
        f'<div class="card"><div class="head">'
        f'{img_tag(png_data_uri(hwc, display_scale(size)), f"image {i}", "main", width=DISPLAY_SIZE)}'
        f'<div class="pred"><div class="muted file fill">#{i}{where}</div>'
        f'<div class="cls">{esc(pred_name)} <span class="prob">{probs[pred]:.1%}</span>{verdict}</div>'
        f'<div class="muted">next: {runner or "—"}</div>'
        f"{_bars_html(rows, len(e.top_concepts) - len(rows), scale)}</div></div>"
        f'<div class="heats">{"".join(heats)}</div></div>'
    )


def _short_path(file: str) -> str:
    """``folder/name.png``: the image's parent folder (its class in an ImageFolder) and file name."""
    p = Path(file)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def labels_from_folders(files: Sequence[str] | None, class_names: Sequence[str]) -> list[int] | None:
    """True labels from the images' parent folder names when every one of them names a class of the model (an
    ImageFolder of the model's classes: the folder itself, or its display form ``blue_circle`` → ``blue circle``
    that training saves as the class name, :func:`fastcbm.salf.train.humanize_class_name`), else None."""
    if not files or not class_names:
        return None
    from fastcbm.salf.train import humanize_class_name

    index = {str(c): i for i, c in enumerate(class_names)}
    labels = []
    for f in files:
        folder = Path(f).parent.name
        i = index.get(folder, index.get(humanize_class_name(folder)))
        if i is None:  # some folder is not a class: the folders are not labels
            return None
        labels.append(i)
    return labels


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


def _rules_html(rules: Mapping[str, Sequence[tuple[str, float]]] | None) -> str:
    if rules is None:
        return ('<p class="note">Decision rules are not available on this page: it was made without the model\'s '
                "head weights (e.g. from an exported graph).</p>")
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
    rules: Mapping[str, Sequence[tuple[str, float]]] | None,
    summary: Mapping[str, Any],
    class_names: Sequence[str],
    labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    segmentation: Mapping[str, Any] | None = None,
    title: str = "fastcbm SALF-CBM report",
    files: Sequence[str] | None = None,
) -> Path:
    """Write a self-contained HTML report of a SALF-CBM and return its path.

    Args:
        path: the ``.html`` file to write (parent folders are created; written atomically).
        images: uint8 ``[n, 3, S, S]``, the images that were explained (raw pixels, not normalised). May be None or
            empty when ``explanations`` is empty.
        explanations: ``n`` :class:`~fastcbm.salf.explain.Explanation` (``probabilities [K]``, ``top_concepts`` k
            tuples, ``heatmaps [k, H, W]``; maps at another resolution than S are resized bilinearly).
        rules: class → [(concept, weight)], the non-zero head weights (``salf.explain.decision_rules``); None when
            they are not available (a page made from an exported graph says so).
        summary: name → number or string, shown as a table at the top (floats to 4 significant digits).
        class_names: ``K`` class names (used for the true label and when an explanation has no class name).
        labels: optional true labels ``[n]`` (ints); each card then shows ✓ / ✗.
        segmentation: optional dict ``images`` uint8 ``[m, 3, S, S]``, ``masks`` bool ``[m, S, S]``, ``salf`` and
            ``gradcam`` float ``[m, H, W]``: one row per image (image, GT mask, SALF heatmap, Grad-CAM heatmap).
        title: page title (escaped).
        files: optional ``n`` image paths, named on the cards; without ``labels``, when every image's parent folder
            is one of ``class_names`` (an ImageFolder of the model's classes), the folders are the true labels.

    Raises:
        InvalidArgument: a shape or length does not match; the message names the argument.
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
    if files is not None and len(files) != n:
        raise InvalidArgument(f"files has {len(files)} paths but explanations has {n}")
    class_names = [str(c) for c in class_names]
    labs: list[int] | None = None
    from_folders = False
    if labels is not None:
        la = to_numpy(labels, "labels")
        if la.ndim != 1 or la.shape[0] != n:
            raise InvalidArgument(f"labels must be [n] with n = {n}, got shape {tuple(la.shape)}")
        labs = [int(v) for v in la.tolist()]
    else:
        labs = labels_from_folders(files, class_names)
        from_folders = labs is not None
    if rules is not None and not isinstance(rules, Mapping):
        raise InvalidArgument(f"rules must be a dict class → [(concept, weight)], got {type(rules).__name__}")
    if not isinstance(summary, Mapping):
        raise InvalidArgument(f"summary must be a dict name → value, got {type(summary).__name__}")
    checked = [_check_explanation(e, i) for i, e in enumerate(explanations)]  # validate everything before drawing

    shown = [c for e in explanations for _, _, c, _ in _shown_concepts(e)]
    scale = bar_scale(shown)
    if n:
        cards = "".join(_card_html(i, imgs[i], e, p, h, class_names, None if labs is None else labs[i], scale,
                                   None if files is None else str(files[i]))
                        for i, (e, (p, h)) in enumerate(zip(explanations, checked)))
        cards_html = bar_legend(shown) + f'<div class="cards">{cards}</div>'
    else:
        cards_html = '<p class="note">No images were explained.</p>'
    seg_html = ""
    if segmentation is not None:
        if not isinstance(segmentation, Mapping):
            raise InvalidArgument(f"segmentation must be a dict, got {type(segmentation).__name__}")
        seg_html = f"<h2>Zero-shot segmentation</h2>{_segmentation_html(segmentation)}"
    truth = (" ✓ / ✗: the prediction against the image's folder name (the folders are the model's classes)."
             if from_folders else "")
    body = (
        f"<h2>Summary</h2>{summary_html(summary)}"
        f"<h2>Explanations ({n} image{'s' if n != 1 else ''})</h2>"
        '<p class="muted">Bars: contribution of each concept to the predicted class logit (green: for, red: against); '
        "act.: standardised concept activation (below 0: below the concept's training average, named "
        f"“no …”). Heatmaps: where each concept is, min-max normalised.{truth}</p>"
        f"{cards_html}"
        f"<h2>Decision rules</h2>{_rules_html(rules)}"
        f"{seg_html}"
    )
    return write_page(path, page_html(title, body))
