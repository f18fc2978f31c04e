"""The self-contained HTML report (fastcbm.salf.report): content, escaping, inline PNGs, empty case, shape errors."""

from __future__ import annotations

import base64
import io
import re

import pytest
import torch
from PIL import Image

from fastcbm.salf.report import write_salf_report
from fastcbm.salf.explain import Explanation

CLASSES = ["circle", "square", "triangle"]
CONCEPTS = ["red blob", "straight edge", "<b>&", "corner", "curve", "stripes"]
PNG_RE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def fake_explanations(n: int, size: int = 16, k: int = 3, seed: int = 0) -> list[Explanation]:
    """Random Explanations as salf.explain.explain would return them (no model needed)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        probs = torch.softmax(torch.randn(len(CLASSES), generator=g), 0)
        pred = int(probs.argmax())
        contrib = torch.randn(len(CONCEPTS), generator=g)
        top = torch.arange(i, i + k) % len(CONCEPTS)  # every image shows "<b>&" (index 2) at least once over the set
        out.append(Explanation(
            predicted=pred, class_name=CLASSES[pred], probabilities=probs, contributions=contrib,
            top_concepts=[(CONCEPTS[j], float(contrib[j]), float(torch.randn(1, generator=g))) for j in top.tolist()],
            top_indices=top, heatmaps=torch.rand(k, size, size, generator=g)))
    return out


def fake_rules() -> dict[str, list[tuple[str, float]]]:
    return {"circle": [("curve", 0.9), ("red blob", 0.4), ("corner", -0.3)],
            "square": [("corner", 0.8), ("straight edge", 0.5), ("<b>&", -0.2)],
            "triangle": [("corner", 0.6), ("stripes", 0.1)]}


def images(n: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def decode_all_pngs(text: str) -> list[Image.Image]:
    pngs = []
    for b64 in PNG_RE.findall(text):
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()  # full decode, not just the header
        assert img.format == "PNG"
        pngs.append(img)
    return pngs


def test_full_report(tmp_path):
    n, size, k = 4, 16, 3
    seg = {"images": images(2, size), "masks": torch.rand(2, size, size) > 0.5,
           "salf": torch.rand(2, size, size), "gradcam": torch.rand(2, 7, 7)}  # Grad-CAM at grid size: resized
    out = write_salf_report(
        tmp_path / "nested" / "dir" / "report.html",
        images=images(n, size), explanations=fake_explanations(n, size, k), rules=fake_rules(),
        summary={"accuracy": 0.91234567, "backbone accuracy": 0.95, "mIoU SALF vs Grad-CAM": "0.61 vs 0.48",
                 "train time (s)": 12.5, "samples": 300},
        class_names=CLASSES, labels=torch.tensor([0, 1, 2, 0]), segmentation=seg, title="Demo <report>")
    assert out == tmp_path / "nested" / "dir" / "report.html" and out.is_file()
    text = out.read_text(encoding="utf-8")
    assert not list(out.parent.glob("*.tmp")), "temp file left behind"
    # summary values (floats to 4 significant digits), classes, concepts, title escaped
    for s in ("accuracy", "0.9123", "backbone accuracy", "0.95", "0.61 vs 0.48", "12.5", "300",
              "<title>Demo &lt;report&gt;</title>", "Zero-shot segmentation", "Decision rules"):
        assert s in text, s
    for name in CLASSES + [c for c in CONCEPTS if c != "<b>&"]:
        assert name in text, name
    # HTML-escaping: the raw concept name never appears, its escaped form does
    assert "<b>&" not in text and "&lt;b&gt;&amp;" in text
    assert "✓" in text or "✗" in text
    # every inline picture decodes: n main images + n·k heatmaps + 1 diagram + 2·4 segmentation cells
    pngs = decode_all_pngs(text)
    assert len(pngs) == n + n * k + 1 + 2 * 4
    assert pngs[0].size == (size * 4, size * 4)  # small images upscaled ×4, nearest neighbour
    # self-contained: no external resources
    assert not re.search(r'(src|href)="(?!data:)', text)
    assert "<script" not in text and "<link" not in text


def test_heatmap_overlay_uses_minmax_normalised_colormap(tmp_path):
    """A map that is high on the left half only must colour the left and right halves differently."""
    e = fake_explanations(1, size=8, k=1)[0]
    heat = torch.zeros(1, 8, 8)
    heat[0, :, :4] = 5.0
    e.heatmaps = heat
    img = torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)
    text = write_salf_report(tmp_path / "r.html", images=img, explanations=[e], rules={}, summary={},
                             class_names=CLASSES).read_text()
    overlay = decode_all_pngs(text)[1].convert("RGB")
    left, right = overlay.getpixel((0, 0)), overlay.getpixel((overlay.width - 1, 0))
    assert left != right and left[0] > right[0]  # jet: high → red, low → blue


def test_empty_report(tmp_path):
    out = write_salf_report(tmp_path / "empty.html", images=torch.zeros(0, 3, 16, 16, dtype=torch.uint8),
                            explanations=[], rules={}, summary={}, class_names=CLASSES)
    text = out.read_text()
    assert "No images were explained" in text and "No decision rules" in text
    assert write_salf_report(tmp_path / "none.html", images=None, explanations=[], rules={"a": []},
                             summary={"x": 1}, class_names=[]).is_file()


def test_size_is_reasonable(tmp_path):
    """~12 explained images of 64 px with 5 heatmaps each stays at a few MB, even for random noise."""
    n, size = 12, 64
    out = write_salf_report(tmp_path / "r.html", images=images(n, size), explanations=fake_explanations(n, size, 5),
                            rules=fake_rules(), summary={"accuracy": 0.9}, class_names=CLASSES)
    assert out.stat().st_size < 8 * 2**20


def test_overwrites_atomically(tmp_path):
    p = tmp_path / "r.html"
    p.write_text("old")
    write_salf_report(p, images=None, explanations=[], rules={}, summary={"v": "new"}, class_names=CLASSES)
    assert "new" in p.read_text() and sorted(x.name for x in tmp_path.iterdir()) == ["r.html"]


@pytest.mark.parametrize("kwargs, name", [
    (dict(images=torch.zeros(2, 3, 16, 16)), "images"),  # float, not uint8
    (dict(images=torch.zeros(2, 16, 16, 3, dtype=torch.uint8)), "images"),  # channels last
    (dict(images=torch.zeros(3, 3, 16, 16, dtype=torch.uint8)), "images"),  # count mismatch
    (dict(labels=torch.tensor([0, 1, 2])), "labels"),
    (dict(rules=[("a", 1.0)]), "rules"),
    (dict(segmentation={"images": torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "masks": torch.zeros(1, 8, 8).bool(),
                        "salf": torch.zeros(1, 16, 16), "gradcam": torch.zeros(1, 16, 16)}), "segmentation['masks']"),
    (dict(segmentation={"images": torch.zeros(1, 3, 16, 16, dtype=torch.uint8)}), "segmentation"),
])
def test_bad_shapes_raise(tmp_path, kwargs, name):
    args = dict(images=images(2), explanations=fake_explanations(2), rules=fake_rules(), summary={},
                class_names=CLASSES)
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(name)):
        write_salf_report(tmp_path / "r.html", **args)
    assert not (tmp_path / "r.html").exists()


def test_bad_explanation_heatmaps_raise(tmp_path):
    exps = fake_explanations(2)
    exps[1].heatmaps = torch.zeros(16, 16)
    with pytest.raises(ValueError, match=re.escape("explanations[1].heatmaps")):
        write_salf_report(tmp_path / "r.html", images=images(2), explanations=exps, rules={}, summary={},
                          class_names=CLASSES)
    exps[1].heatmaps = torch.zeros(2, 16, 16)  # 2 maps for 3 concepts
    with pytest.raises(ValueError, match=re.escape("explanations[1].heatmaps")):
        write_salf_report(tmp_path / "r.html", images=images(2), explanations=exps, rules={}, summary={},
                          class_names=CLASSES)


@pytest.mark.parametrize("v, text", [(0.902, "+0.902"), (-0.061, "-0.061"), (0.0, "0"), (-0.0, "0"),
                                     (3.0e-07, "+3.0e-07"), (-4.9e-4, "-4.9e-04"), (5e-4, "+0.001")])
def test_signed_never_prints_a_tiny_value_as_zero(v, text):
    from fastcbm.html import signed

    assert signed(v) == text


def test_bars_share_the_page_scale_and_zero_rows_go(tmp_path):
    """The HTML itself (the browser test reads the layout): one data-scale = the largest |contribution| shown; exact
    and rounded-away zeros are not listed; absent concepts are named "no …" in rows and captions alike."""
    from fastcbm.salf.report import labels_from_folders

    e1, e2 = fake_explanations(2, k=3)
    e1.top_concepts = [("curve", 0.007, 0.4), ("stripes", 0.2, -1.5), ("corner", -0.0, -0.3)]
    e2.top_concepts = [("curve", 0.7, 1.2), ("corner", 0.0004, 0.2), ("red blob", -0.1, -0.2)]
    files = ["/d/circle/a.png", "/d/square/b.png"]
    text = write_salf_report(tmp_path / "r.html", images=images(2), explanations=[e1, e2], rules=fake_rules(),
                             summary={}, class_names=CLASSES, files=files).read_text()
    assert set(re.findall(r'data-scale="([^"]+)"', text)) == {"0.7"}
    assert sorted(map(float, re.findall(r'data-v="([^"]+)"', text))) == [-0.1, 0.007, 0.2, 0.7]
    assert "0.000</td>" not in text and text.count("1 more of the top concepts contribute 0.000") == 2
    assert "<figcaption>no stripes</figcaption>" in text and "<figcaption>no red blob</figcaption>" in text
    assert ">no stripes</td>" in text and "circle/a.png" in text and text.count("true: ") == 2
    assert labels_from_folders(files, CLASSES) == [0, 1]
    assert labels_from_folders(["/d/red_blob/x.png"], ["red blob"]) == [0]  # ImageFolder name → class display name
    assert labels_from_folders(["/d/circle/a.png", "/d/other/b.png"], CLASSES) is None
    assert labels_from_folders(None, CLASSES) is None
    with pytest.raises(ValueError, match="files has 1 paths but explanations has 2"):
        write_salf_report(tmp_path / "x.html", images=images(2), explanations=[e1, e2], rules={}, summary={},
                          class_names=CLASSES, files=files[:1])


def test_no_bar_legend_without_a_bar(tmp_path):
    from fastcbm.cefam.explain import CEFAMExplanation, ConceptExplanation
    from fastcbm.cefam.report import write_cefam_report

    e = CEFAMExplanation(0, "circle", torch.tensor([0.9, 0.1]),
                         [ConceptExplanation("dot", 12.0, "layer4", {"layer4": 0.2}, 0.0)], torch.rand(1, 16, 16))
    text = write_cefam_report(tmp_path / "c.html", images=images(1), explanations=[e], summary={}).read_text()
    assert "Bars share one scale" not in text and "(1 of 1 exactly 0)" in text
    e.concepts[0].contribution = 0.25
    text = write_cefam_report(tmp_path / "c.html", images=images(1), explanations=[e], summary={}).read_text()
    assert "a full bar is contribution 0.250" in text and "exactly 0" not in text
