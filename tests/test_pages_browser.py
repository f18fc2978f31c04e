"""Every explanation page, opened in a real headless Chromium at 1,280 px wide and read for layout properties (not
pixels): nothing wider than the window, pictures keep their aspect ratio, no text spills out of its cell or breaks
mid-word, bars are proportional to their values with one scale per page, absent concepts are named "no …",
zero contributions are not listed, the folder page checks predictions against the folder names, a table too wide for
the window scrolls inside its own box and says so.

The pages are built from small synthetic inputs (a few 64-px images, no model), so the whole module takes seconds.
It drives Debian's Chromium through playwright (``executable_path``: playwright's own browser download is never
used) and skips with one line where either is missing. ``FASTCBM_PAGE_SHOTS=DIR`` keeps a full-page screenshot of
each page there for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

WIDTH = 1280
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = ("browser page tests need Chromium and playwright: apt-get install chromium; pip install playwright "
           "(in the test extra; never 'playwright install')")
# Chromium on a machine without network access: no background connections, no GPU, no sandbox (containers)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# What a reader would notice, measured in the page (CSS px).
MEASURE = r"""() => {
  const W = window.innerWidth, out = {width: W, scrollWidth: document.documentElement.scrollWidth};
  const inScroll = e => !!e.parentElement && !!e.parentElement.closest('.scrollx');
  const desc = e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : '') + ' "' +
                    (e.textContent || e.alt || '').trim().slice(0, 40) + '"';
  out.outside = [...document.body.querySelectorAll('*')]
    .filter(e => !inScroll(e) && e.getBoundingClientRect().right > W + 0.5).map(desc);
  out.images = [...document.images].map(i => {
    const r = i.getBoundingClientRect(), s = getComputedStyle(i);
    const px = k => parseFloat(s[k]) || 0;
    return {alt: i.alt, nw: i.naturalWidth, nh: i.naturalHeight,
            w: r.width - px('borderLeftWidth') - px('borderRightWidth') - px('paddingLeft') - px('paddingRight'),
            h: r.height - px('borderTopWidth') - px('borderBottomWidth') - px('paddingTop') - px('paddingBottom')};
  });
  const texts = [...document.querySelectorAll('td, th, figcaption, .cls, p, h1, h2, h3')]
    .filter(e => !e.querySelector('img, table'));
  const boxes = [...document.querySelectorAll('.card, .head, .pred, .heats, figure, .scrollx')];
  out.overflow = texts.concat(boxes.filter(e => !e.classList.contains('scrollx') || getComputedStyle(e).overflowX
                                           !== 'auto')).filter(e => e.scrollWidth > e.clientWidth + 1).map(desc);
  out.broken = [];  // a word laid out on two lines (a break inside a word, not at a space, hyphen or slash)
  for (const e of texts) {
    if (e.closest('.file')) continue;  // file paths may break anywhere
    const walk = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
    for (let n = walk.nextNode(); n; n = walk.nextNode()) {
      for (const m of n.textContent.matchAll(/[^\s\-\/]+/g)) {  // a line may end after a hyphen or slash
        const r = document.createRange();
        r.setStart(n, m.index); r.setEnd(n, m.index + m[0].length);
        const tops = new Set([...r.getClientRects()].filter(q => q.width > 0).map(q => Math.round(q.top)));
        if (tops.size > 1) out.broken.push(m[0]);
      }
    }
  }
  out.bars = [...document.querySelectorAll('.bar')].map(b => ({
    v: parseFloat(b.dataset.v), scale: parseFloat(b.dataset.scale), w: b.getBoundingClientRect().width,
    track: b.parentElement.getBoundingClientRect().width}));
  out.cards = [...document.querySelectorAll('.card')].map(c => ({
    head: c.querySelector('.cls').textContent, file: (c.querySelector('.file') || {}).textContent || '',
    names: [...c.querySelectorAll('td.cname')].map(e => e.textContent),
    numbers: [...c.querySelectorAll('table.contrib td.val')].map(e => e.textContent),
    captions: [...c.querySelectorAll('figcaption')].map(e => e.textContent),
    note: [...c.querySelectorAll('tr.hidden')].map(e => e.textContent).join(' ')}));
  out.scrollers = [...document.querySelectorAll('.scrollx')].map(b => {
    const cue = b.previousElementSibling;
    const seen = !!cue && cue.classList.contains('scroll-cue') && cue.getBoundingClientRect().height > 0;
    return {scroll: b.scrollWidth, client: b.clientWidth, overflowX: getComputedStyle(b).overflowX, cue: seen};
  });
  out.text = document.body.innerText;
  return out;
}"""


def _browser_path() -> str | None:
    found = os.environ.get("FASTCBM_CHROMIUM")
    if found:
        return found if Path(found).is_file() else None
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One Chromium tab at 1,280 × 900 with a fresh profile; ``read(path)`` opens a page and returns MEASURE's dict."""
    exe = _browser_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(INSTALL)
    if exe is None:
        pytest.skip(INSTALL)
    shots = os.environ.get("FASTCBM_PAGE_SHOTS")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                   executable_path=exe, headless=True, args=ARGS,
                                                   viewport={"width": WIDTH, "height": 900})
        tab = ctx.new_page()

        def read(path: Path) -> dict[str, Any]:
            tab.goto(path.resolve().as_uri(), wait_until="load")
            m = tab.evaluate(MEASURE)
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                tab.screenshot(path=str(Path(shots) / f"{path.stem}.png"), full_page=True)
            return m

        yield read
        ctx.close()


# ------------------------------------------------------------------------------------------------ shared checks


def check_layout(m: dict[str, Any]) -> None:
    """What every page must satisfy at 1,280 px."""
    assert m["width"] == WIDTH
    assert m["scrollWidth"] <= WIDTH, f"page is {m['scrollWidth']} px wide; past the window: {m['outside'][:5]}"
    assert not m["outside"], f"elements past the window's right edge: {m['outside'][:5]}"
    bad = [i for i in m["images"] if i["nw"] and abs(i["w"] / i["h"] - i["nw"] / i["nh"]) > 0.01 * i["nw"] / i["nh"]]
    assert not bad, f"{len(bad)} pictures drawn out of aspect ratio, e.g. {bad[0]}"
    assert all(i["w"] >= 1 and i["h"] >= 1 for i in m["images"]), "a picture drawn at zero size"
    assert not m["overflow"], f"text spilling out of its box: {m['overflow'][:5]}"
    assert not m["broken"], f"words broken mid-word: {m['broken'][:10]}"


def check_bars(m: dict[str, Any], values: list[float]) -> None:
    """One scale for the page (the largest |value| drawn) and every bar |v| / scale of its track."""
    bars = m["bars"]
    assert sorted(b["v"] for b in bars) == pytest.approx(sorted(values), rel=1e-9)
    scale = max(abs(v) for v in values) or 1.0
    assert [b["scale"] for b in bars] == pytest.approx([scale] * len(bars)), "bars on one page use different scales"
    worst = max(abs(b["w"] - b["track"] * abs(b["v"]) / scale) for b in bars)
    assert worst <= 0.6, f"a bar is {worst:.2f} px off its value (one page-wide scale {scale})"
    assert len({round(b["track"], 1) for b in bars}) == 1, "bar tracks of different widths"


# -------------------------------------------------------------------------------------------------- page inputs


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


CLASSES = ["blue circle", "yellow triangle", "cyan cross"]
# (name, contribution, standardised activation): present, absent (negative weight), two exact zeros as a sparse head
# gives them (one -0.0 of a below-average concept), evidence against from a present and from an absent concept
SALF_ROWS = [
    [("purple", 1.503, 1.72), ("triangle", 0.208, -1.90), ("striped", -0.0, -0.39), ("green", 0.0, 0.41),
     ("checkered", -0.31, 0.8)],
    [("blue", 3.732, 3.47), ("border", 0.065, -0.21), ("dot", 0.0, -0.48), ("square", -0.12, -0.9),
     ("a long concept description that has to wrap", 0.9, 0.3), ("checkered", 0.44, 0.2), ("solid", 0.3, 0.1),
     ("cross", 0.2, 0.5)],  # a tall contribution table: the main image beside it must not stretch
    [("cyan", 0.004, 0.2), ("cross", 0.0, 0.1), ("purple", -0.0, -0.1)],
]


def _salf_explanations(size: int = 64):
    from fastcbm.salf.explain import Explanation

    out = []
    for i, rows in enumerate(SALF_ROWS):
        probs = torch.softmax(torch.tensor([2.0, 1.0, 0.5]).roll(i), 0)
        pred = int(probs.argmax())
        out.append(Explanation(pred, CLASSES[pred], probs, torch.zeros(8), [tuple(r) for r in rows],
                               torch.arange(len(rows)), torch.rand(len(rows), 7, 7)))
    return out


def _salf_page(tmp_path: Path, *, files=None, rules: Any = "model", name: str = "salf") -> Path:
    from fastcbm.salf.report import write_salf_report

    seg = {"images": _images(2, seed=1), "masks": torch.rand(2, 64, 64) > 0.5, "salf": torch.rand(2, 64, 64),
           "gradcam": torch.rand(2, 7, 7)}
    if rules == "model":
        rules = {"blue circle": [("blue", 0.9), ("border", -0.3)], "yellow triangle": [("triangle", 0.8)],
                 "cyan cross": [("cyan", 0.7), ("cross", 0.6), ("purple", -0.2)]}
    return write_salf_report(tmp_path / f"{name}.html", images=_images(3), explanations=_salf_explanations(),
                             rules=rules, summary={"salf accuracy": 0.8667, "segmentation": {"miou": 0.3685}},
                             class_names=CLASSES, labels=None if files else torch.tensor([0, 2, 2]),
                             segmentation=None if files else seg, files=files)


def _cefam_page(tmp_path: Path, contributions: list[list[float]], name: str) -> Path:
    from fastcbm.cefam.explain import CEFAMExplanation, ConceptExplanation
    from fastcbm.cefam.report import write_cefam_report

    names = ["checkered", "striped", "triangle", "dot", "solid"]
    expl = [CEFAMExplanation(1, CLASSES[1], torch.tensor([0.2, 0.7, 0.1]),
                             [ConceptExplanation(names[j], 16.6 - j, f"layer{j % 4 + 1}", {"layer1": 0.1}, c)
                              for j, c in enumerate(cs)], torch.rand(len(cs), 16, 16))
            for cs in contributions]
    per_type = {"object": {"nra": 0.656, "nra_paper": 1.374, "epg": 0.53, "hit_rate": 0.79, "pairs": 87},
                "color": {"nra": 0.68, "nra_paper": 0.64, "epg": 0.36, "hit_rate": 0.79, "pairs": 56}}
    evaluation = {"cefam": {"oracle_best_layer": {"per_type": per_type, "mean": {"nra": 0.6, "nra_paper": 1.01}}},
                  "note": "oracle note"}
    cmp = {"images": _images(2, seed=3), "masks": [torch.rand(64, 64) > 0.5] * 2, "concepts": ["dot", "triangle"],
           "cefam": [torch.rand(16, 16)] * 2, "clip_dissect": [torch.rand(8, 8)] * 2}
    return write_cefam_report(tmp_path / f"{name}.html", images=_images(len(expl), seed=2), explanations=expl,
                              summary={"classifier": "testbed"}, class_names=CLASSES, evaluation=evaluation,
                              comparisons=cmp)


def _deal_page(tmp_path: Path, k: int, name: str, models=("base", "plain", "deal"), metrics: bool = True) -> Path:
    from fastcbm.deal.report import write_deal_report

    texts = ["blue circle", *[f"concept {j}" for j in range(k)]]
    maps = {m: torch.rand(k + 1, 16, 16) for m in models}
    results = {m: {"disentanglability": 0.81, "localizability": 0.71} for m in maps} if metrics else None
    return write_deal_report(tmp_path / f"{name}.html", image=_images(1, seed=4)[0], maps=maps, texts=texts,
                             results=results, summary={"steps": 60})


# ---------------------------------------------------------------------------------------------------------- tests


def test_salf_report_reads_right(browser, tmp_path):
    m = browser(_salf_page(tmp_path))
    check_layout(m)
    shown = [[r for r in rows if abs(r[1]) >= 5e-4] for rows in SALF_ROWS]
    check_bars(m, [c for rows in shown for _, c, _ in rows])
    assert len(m["cards"]) == 3
    for card, rows, all_rows in zip(m["cards"], shown, SALF_ROWS):
        want = [("no " if a < 0 else "") + n for n, _, a in rows]
        assert sorted(card["names"]) == sorted(want) and sorted(card["captions"]) == sorted(want), card
        assert not any(x.strip() in ("+0.000", "-0.000", "0.000") for x in card["numbers"]), card["numbers"]
        hidden = len(all_rows) - len(rows)
        assert (f"{hidden} more of the top concepts contribute 0.000" in card["note"]) == bool(hidden), card["note"]
    assert all(("✓" in c["head"]) != ("✗" in c["head"]) for c in m["cards"])  # labels given: ✓ or ✗ on each card
    assert "Decision rules" in m["text"] and "Zero-shot segmentation" in m["text"]


def test_salf_folder_page_checks_the_folder_names(browser, tmp_path):
    # the testbed's export (and a user's ImageFolder): folder "blue_circle" is the model's class "blue circle"
    files = [str(tmp_path / "images" / c / f"00000{i}.png") for i, c in enumerate(["blue_circle", "blue circle",
                                                                                  "cyan-cross"])]
    m = browser(_salf_page(tmp_path, files=files, name="folder"))
    check_layout(m)
    heads = [c["head"] for c in m["cards"]]
    assert ["✓" in h for h in heads] == [True, False, True] and all("true:" in h for h in heads), heads
    assert [c["file"].split(" · ")[-1] for c in m["cards"]] == ["blue_circle/000000.png", "blue circle/000001.png",
                                                                 "cyan-cross/000002.png"]
    assert "the folders are the model's classes" in m["text"]
    # folders that are not classes are not labels
    m = browser(_salf_page(tmp_path, files=[str(tmp_path / "x" / f"{i}.png") for i in range(3)], name="nolabels"))
    assert not any("✓" in c["head"] or "✗" in c["head"] for c in m["cards"])


def test_salf_page_from_a_graph_says_rules_are_unavailable(browser, tmp_path):
    m = browser(_salf_page(tmp_path, rules=None, name="engine"))
    check_layout(m)
    assert "Decision rules are not available" in m["text"] and "no non-zero weights" not in m["text"]


def test_cefam_bars_share_one_scale(browser, tmp_path):
    contributions = [[0.007, -0.061, 0.12, 0.004, 0.018], [0.7, 0.744, -0.474, 0.769, 0.019]]
    m = browser(_cefam_page(tmp_path, contributions, "cefam"))
    check_layout(m)
    check_bars(m, [c for cs in contributions for c in cs])
    small = next(b for b in m["bars"] if b["v"] == 0.007)
    big = next(b for b in m["bars"] if b["v"] == 0.7)
    assert big["w"] == pytest.approx(100 * small["w"], rel=0.02)  # +0.007 is a hundredth of +0.7's bar
    numbers = [x for c in m["cards"] for x in c["numbers"]]
    assert "+0.007" in numbers and "+0.700" in numbers
    assert "nra_paper above 1: object 1.374" in m["text"] and "mean 1.01" in m["text"]


def test_cefam_page_with_zero_contributions_says_so(browser, tmp_path):
    contributions = [[0.0] * 5, [3.0e-07] * 5]
    m = browser(_cefam_page(tmp_path, contributions, "cefam_zero"))
    check_layout(m)
    numbers = [x for c in m["cards"] for x in c["numbers"]]
    assert numbers == ["0"] * 5 + ["+3.0e-07"] * 5, numbers  # the data as it is: exact zeros, then tiny values
    assert "Every contribution on this page is below 0.0005 in size (5 of 10 exactly 0)" in m["text"]
    check_bars(m, [c for cs in contributions for c in cs])  # the page's scale is its largest value, 3e-07


@pytest.mark.parametrize("k, scrolls", [(3, False), (14, True)])
def test_deal_maps_fit_or_scroll_in_their_box(browser, tmp_path, k, scrolls):
    m = browser(_deal_page(tmp_path, k, f"deal{k}"))
    check_layout(m)
    (box,) = m["scrollers"]
    assert (box["scroll"] > box["client"] + 1) == scrolls, box
    assert box["cue"] == scrolls, box  # a visible line says the table scrolls, only when it does
    assert box["overflowX"] == "auto"
    maps = [i for i in m["images"] if ":" in i["alt"] or i["alt"] == "image"]
    assert len(maps) == 3 * (k + 2)
    assert all(i["w"] >= 96 - 0.5 and i["w"] <= i["nw"] + 0.5 for i in maps), maps[:3]  # shrunk, never blown up


def test_deal_explain_page_of_one_model(browser, tmp_path):
    """``fastcbm deal explain --html``: one model (named after its folder), no metrics."""
    m = browser(_deal_page(tmp_path, 5, "deal_one", models=("deal-model-finetuned",), metrics=False))
    check_layout(m)
    assert "Metrics" not in m["text"] and len(m["images"]) == 7 and not m["scrollers"][0]["cue"]
