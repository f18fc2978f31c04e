"""Benchmark: one DEAL training step vs one plain contrastive fine-tuning step on the same batch (time, peak memory).

Both steps: forward, symmetric InfoNCE on the concept-augmented captions, backward, Adam update (fp32 weights). The
DEAL step adds the differentiable explanations of the category and its K concepts (``fastcbm.deal.explain``: the
tower's one pass also gives the image embedding, K+1 batched VJPs through the last stage/block with
``create_graph=True``) and the published λ_sep·R_sep + λ_con·R_con + λ_spa·R_spa on them, so its backward also runs
the double-backward through the explained stage. The step is the body of ``fastcbm.deal.train.train_deal``'s loop.
Variants: ``deal`` is the default (``explain_text_grad=False``: the K+1 explained texts are encoded without gradient,
so the regularisers train the image tower; the captions go through the text tower with gradient as in the plain
step); ``deal_text_grad`` (``--explain-text-grad``) encodes the captions and explained texts in one text-tower call
with gradient, so the regularisers also train the text tower — it shows what that backward costs; ``deal_layer3``
(ResNet towers only) is the default with Grad-CAM on ``layer3`` (``--explain-layer layer3``: batched VJPs through
layer4 and the pool, no closed form). Before 2026-12-02T07:30 the CSV's ``deal`` rows were the text-gradient form and
``deal_const_texts`` the current default; they are relabelled ``deal_text_grad`` and ``deal``. Target: ≤ 1.5× the
plain step (the paper reports 1.97× per ImageNet epoch with detached, image-replicating explanations).

Models: the bundled testbed CLIP (64², ModifiedResNet tower, batch 16) and a randomly initialised open_clip ViT-B-32
(224², batch 4; quick: 2). Each model runs in its own process holding both methods' copies, their timed steps
interleaved (plain, DEAL, plain, …) so that a loaded machine slows both alike. Peak memory as in
``bench/losses.py`` (CPU: VmHWM − VmRSS over one step after resetting the high-water mark, with
``MALLOC_MMAP_THRESHOLD_=65536``; GPU: ``max_memory_allocated`` beyond what was allocated before the step): the
step's peak beyond the steady state (weights, Adam state and the previous step's gradients), i.e. activations, the
explanation graph and transients.

    python bench/deal.py [--quick] [--device cpu|cuda] [--models testbed vit-b-32] [--repeats N] [--threads N]
                         [--note TEXT]
Rows are appended to bench/results/deal.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from _timing import peak_extra_bytes, peak_start, quantiles

RESULTS = Path(__file__).resolve().parent / "results" / "deal.csv"
K = 5  # concepts per class, as published
# plain contrastive fine-tuning; DEAL as fastcbm.deal.train runs it by default (explained texts without gradient: the
# regularisers train the image tower); DEAL with --explain-text-grad; DEAL with Grad-CAM on layer3 (ResNet towers)
METHODS = ("plain", "deal", "deal_text_grad", "deal_layer3")


def methods_for(name: str) -> tuple[str, ...]:
    return METHODS if name == "testbed" else tuple(m for m in METHODS if m != "deal_layer3")


MODELS = {"testbed": {"batch": 16, "quick_batch": 16}, "vit-b-32": {"batch": 4, "quick_batch": 2}}



def _model(name: str, device):
    from fastcbm.models import load_clip

    if name == "testbed":
        model, _, tok = load_clip("testbed")
        size = 64
    else:
        from fastcbm.compat import import_open_clip

        open_clip = import_open_clip()
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        tok = open_clip.get_tokenizer("ViT-B-32")
        size = 224
    return model.to(device).eval(), tok, size


def _batch(name: str, b: int, size: int, device):
    """Images and texts: testbed scenes and their class concepts, or random pixels with generic concept texts."""
    import torch

    if name == "testbed":
        from fastcbm.data import synthetic as S
        from fastcbm.models import testbed as T

        scenes = S.generate(b, seed=S.TRAINING_SEED_LIMIT + 4242)
        x = T.normalize(scenes.images)
        names = S.class_names()
        classes = [names[int(y)] for y in scenes.labels]
        concepts = {c: [c.split()[1], c.split()[0], "border", "dot", "striped"] for c in names}
    else:
        x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))
        classes = [f"class {i}" for i in range(b)]
        concepts = {c: [f"{c} part {j}" for j in range(K)] for c in classes}
    captions = [f"{c}. It may contain {', '.join(concepts[c])}" for c in classes]
    rows = [[c, *concepts[c]] for c in classes]
    return x.to(device), captions, rows


def _stepper(method: str, name: str, x, captions, rows, device):
    """A model, its Adam optimiser and the closure of one training step (the body of ``train_deal``'s loop)."""
    import torch

    from fastcbm.deal.explain import explanations
    from fastcbm.deal.losses import deal_loss

    torch.manual_seed(0)
    model, tok, _ = _model(name, device)
    cuda = device.type == "cuda"
    # as fastcbm.deal.train: one text-tower call per step over the distinct classes' caption and K+1 explained texts
    # (the plain step encodes only the captions: the baseline is plain contrastive fine-tuning, nothing extra)
    keys = [tuple(r) for r in rows]
    uniq = list(dict.fromkeys(keys))
    inv = torch.tensor([uniq.index(r) for r in keys], device=device)
    cap_tokens = tok([captions[keys.index(u)] for u in uniq]).to(device)
    expl_tokens = tok([t for u in uniq for t in u]).to(device)
    c, t = len(uniq), len(rows[0])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-7, betas=(0.9, 0.98), eps=1e-6,
                           weight_decay=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if method == "plain":
                cap_emb = model.encode_text(cap_tokens)[inv]
                maps, img_emb = None, model.encode_image(x)
            elif method in ("deal", "deal_layer3"):  # the default: explained texts as constants (image tower only)
                cap_emb = model.encode_text(cap_tokens)[inv]
                with torch.no_grad():
                    expl_emb = model.encode_text(expl_tokens).view(c, t, -1)[inv]
                maps, img_emb = explanations(model, x, expl_emb, return_embedding=True,
                                             layer="layer3" if method == "deal_layer3" else "layer4")
            else:
                text = model.encode_text(torch.cat([cap_tokens, expl_tokens]))
                cap_emb, expl_emb = text[:c][inv], text[c:].view(c, t, -1)[inv]
                maps, img_emb = explanations(model, x, expl_emb, return_embedding=True)
            loss = deal_loss(maps, img_emb, cap_emb, model.logit_scale.exp())["loss"]
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    return model, step


def child(cfg: dict) -> dict:
    """Both methods in one process, their timed steps interleaved (plain, DEAL, plain, ...) so that a loaded machine
    slows both alike; the first timed step of each also measures its peak extra memory."""
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    _, _, size = _model(cfg["model"], device)
    x, captions, rows = _batch(cfg["model"], cfg["batch"], size, device)
    methods = methods_for(cfg["model"])
    steppers = {m: _stepper(m, cfg["model"], x, captions, rows, device) for m in methods}
    for _, step in steppers.values():
        step()  # warm-up (allocator, thread pool, Adam state)
    times = {m: [] for m in methods}
    extra = {}
    for i in range(cfg["repeats"]):
        for m in methods:
            if i == 0:
                base = peak_start(cuda)
            t0 = time.perf_counter()
            steppers[m][1]()
            times[m].append(time.perf_counter() - t0)
            if i == 0:
                extra[m] = peak_extra_bytes(cuda, base)
    params = sum(p.numel() for p in steppers["plain"][0].parameters())
    return {m: {"times": times[m], "extra_bytes": extra[m], "params": params, "threads": torch.get_num_threads()}
            for m in methods}


def run_child(cfg: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])



def run(quick: bool, device: str, models: list[str] | None = None, repeats: int | None = None,
        threads: int | None = None, note: str | None = None) -> list[dict]:
    """Measure every model's plain and DEAL steps; returns the CSV rows (also for ``python -m bench``)."""
    rows = []
    repeats = repeats or (3 if quick else 7)
    for name in models or list(MODELS):
        batch = MODELS[name]["quick_batch" if quick else "batch"]
        cfg = {"model": name, "device": device, "batch": batch, "repeats": repeats, "threads": threads}
        res = run_child(cfg)
        if "error" in res:
            print(f"{name:<10} failed: {res['error']}")
            continue
        plain_med = quantiles(res["plain"]["times"])[0]
        plain_mem = res["plain"]["extra_bytes"]
        for method in methods_for(name):
            med, p10, p90 = quantiles(res[method]["times"])
            rows.append({"model": name, "method": method, "device": device, "batch": batch, "k": K,
                         "repeats": repeats, "median_s": med, "p10_s": p10, "p90_s": p90,
                         "time_ratio_vs_plain": med / plain_med,
                         "peak_extra_mib": res[method]["extra_bytes"] / 2**20,
                         "mem_ratio_vs_plain": res[method]["extra_bytes"] / max(plain_mem, 1),
                         "params_m": res[method]["params"] / 1e6, "threads": res[method]["threads"],
                         "quick": quick,
                         "note": note if note is not None else os.environ.get("FASTCBM_BENCH_NOTE", "")})
    return rows


def summarize(rows: list[dict]) -> list[tuple[str, str, str, str, str]]:
    """README table rows: per machine/device/model, the latest DEAL row and its ratio to the plain step."""
    from _table import latest, machine

    def _f(r, k):
        try:
            return float(r.get(k) or "nan")
        except ValueError:
            return float("nan")

    out = []
    titles = {"deal": "DEAL training step (default: explained texts without gradient)",
              "deal_text_grad": "DEAL step with --explain-text-grad", "deal_layer3": "DEAL step, --explain-layer layer3"}
    for method, title in titles.items():
        chosen = latest([r for r in rows if r.get("method") == method],
                        lambda r: (machine(r), r.get("device"), r.get("model")))
        for _, r in sorted(chosen.items()):
            plain_s = _f(r, "median_s") / _f(r, "time_ratio_vs_plain")
            q = " (quick)" if str(r.get("quick")).lower() == "true" else ""
            note = f" ({r['note']})" if r.get("note") else ""
            out.append((f"`bench/deal.py` {title}, {r.get('model')} batch {r.get('batch')}{q}", f"{machine(r)}{note}",
                        f"{_f(r, 'median_s'):.3f} s, {_f(r, 'peak_extra_mib'):.0f} MiB peak extra",
                        f"plain contrastive step: {plain_s:.3f} s",
                        (f"{_f(r, 'time_ratio_vs_plain'):.2f}× time (target ≤ 1.5×; paper 1.97×), "
                         f"{_f(r, 'mem_ratio_vs_plain'):.2f}× memory")))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 repeats, ViT-B-32 batch 2")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    ap.add_argument("--models", nargs="*", choices=list(MODELS), default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed steps after the warm-up (default 7; quick 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in the measured processes (default: torch's; 1 is steadier on a loaded box)")
    ap.add_argument("--note", default=None,
                    help="the CSV rows' note, e.g. 'shared, loaded 2-core machine' (default: $FASTCBM_BENCH_NOTE, "
                         "as `python -m bench --note` sets it)")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(args.quick, device, args.models, args.repeats, args.threads, args.note)
    print(f"{'model':<10} {'method':<14} {'batch':>5} {'median s':>9} {'p10 s':>8} {'p90 s':>8} {'× plain':>8} "
          f"{'extra MiB':>10} {'mem ×':>6}")
    for r in rows:
        print(f"{r['model']:<10} {r['method']:<14} {r['batch']:>5} {r['median_s']:>9.3f} {r['p10_s']:>8.3f} "
              f"{r['p90_s']:>8.3f} {r['time_ratio_vs_plain']:>8.2f} {r['peak_extra_mib']:>10.1f} "
              f"{r['mem_ratio_vs_plain']:>6.2f}")
    if rows and not args.no_csv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _rows import append_rows

        append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
