"""Benchmark: CE-FAM regions, association and contribution — batched vs the per-concept / per-step loops.

    python bench/cefam.py                 # random ResNet-50 at 224, 1,000 concepts x 4 stages, D = 512
    python bench/cefam.py --quick         # the same at 96 px (minutes on 2 CPU cores)
    python bench/cefam.py --device cuda

Regions: ``concept_regions(method="batched")`` (one forward, min(T, D) batched VJPs, deepest stage in closed form,
one fuse() per stage) against (a) the authors' way — per concept a forward and ``score.backward()`` with parameter
gradients, as pytorch-grad-cam and the released code do (minus their deep copies of both models) — and (b) fastcbm's
own ``method="loop"`` reference (per concept a forward and a backward to the stage outputs only). The loops are far
too slow for 1,000 concepts on a CPU: they run on a few concepts and their per-concept time is extrapolated to T (the
row says so); the batched maps of those concepts are checked against the loop's (max relative error in the row).
Association (all T concepts x 4 stages x K+1 steps) and contribution (the top-8 concepts of the image, each at its
associated stage, K+1 steps) run batched against their per-step loops, also extrapolated from a few concepts.
The fusion op alone (``fastcbm.cam.fuse``: 1,000 maps 7x7 -> 224x224 with min-max) is timed per backend against
the torch reference (``--fuse-only`` runs just that). Times are wall seconds and process CPU seconds (the latter is
the steadier measure on a shared, loaded machine). Rows go to bench/results/cefam.csv; ``run(quick, device)`` returns
them for ``python -m bench``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from _timing import quantiles

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "cefam.csv"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CPU_TIMES: list[float] = []  # process CPU seconds of the last timed() call's repeats (robust on a shared machine)


def timed(fn, repeats: int, device: torch.device, warmup=None) -> list[float]:
    """Wall seconds of ``repeats`` calls after a warm-up; their process CPU seconds go to ``CPU_TIMES``."""
    (warmup or fn)()  # warm-up (vmap / Triton / allocator / thread pool)
    _sync(device)
    times = []
    CPU_TIMES.clear()
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        CPU_TIMES.append(time.process_time() - c0)
    return times



def authors_regions(model, translator, image, text, layers, logit_scale: float = 100.0) -> dict[str, torch.Tensor]:
    """One concept the authors' way: forward, ``score.backward()`` with parameter gradients (hooks keep the stage
    gradients, as pytorch-grad-cam), β = spatial mean, ReLU(Σβ·A). ``text [1, D]``."""
    from fastcbm.cefam.regions import StageHooks
    from fastcbm.cefam.translator import concept_scores

    grads: dict[str, torch.Tensor] = {}
    with StageHooks(model, layers, track_grad=False) as hooks:
        model(image)
    outs = hooks.outputs
    for n in layers:
        outs[n].register_hook(lambda g, n=n: grads.__setitem__(n, g))
    z = torch.cat([outs[n].mean(dim=(2, 3)) for n in layers], dim=1)
    concept_scores(translator(z), text, logit_scale)[0, 0].backward()
    model.zero_grad(set_to_none=True)
    translator.zero_grad(set_to_none=True)
    return {n: torch.relu((grads[n].mean(dim=(2, 3), keepdim=True) * outs[n]).sum(1)).detach() for n in layers}


def run(quick: bool, device: str, note: str = "", concepts: int = 1000, size: int | None = None,
        loop_concepts: int | None = None, top_k: int = 20, fuse_only: bool = False) -> list[dict]:
    from fastcbm.cam import fuse
    from fastcbm.cefam import Translator
    from fastcbm.cefam.association import association_scores, concept_contributions
    from fastcbm.cefam.regions import concept_grads, concept_regions
    from fastcbm.models import load_backbone

    dev = torch.device(device)
    size = size or (96 if quick else 224)
    n_loop = loop_concepts or (2 if quick else 4)
    d = 512  # CLIP ViT-B/16's embedding width
    torch.manual_seed(0)
    bb = load_backbone("resnet50", device=device)  # random init
    layers = bb.feature_layers
    translator = Translator(3840, d).to(dev).eval()  # the released code's 2048 -> 1024 hidden widths
    image = torch.randn(1, 3, size, size, device=dev)
    text = torch.randn(concepts, d, device=dev)
    base = {"bench": "cefam", "device": dev.type, "model": "resnet50 (random)", "input_size": size,
            "concepts": concepts, "stages": len(layers), "embed_dim": d, "top_k": top_k, "quick": quick,
            "load_note": note, "threads": torch.get_num_threads()}
    rows: list[dict] = []

    def measure(fn, repeats: int = 1, warmup=None, per: int = 1) -> tuple[list[float], float]:
        """(wall seconds per call, median process-CPU seconds per call), both divided by ``per``."""
        wall = timed(fn, repeats, dev, warmup)
        return [w / per for w in wall], statistics.median(CPU_TIMES) / per

    def row(case: str, impl: str, wall: list[float], cpu: float, units: int, baseline_of=None, **extra) -> dict:
        """``wall`` / ``cpu``: seconds for the whole case (extrapolated for loops); ``baseline_of``: the batched row
        this one is the baseline of (its speed-ups are filled in)."""
        med, p10, p90 = quantiles(wall)
        r = {**base, "case": case, "implementation": impl, "median_s": med, "p10_s": p10, "p90_s": p90, "cpu_s": cpu,
             "timed_concepts": units, "speedup": "", "speedup_cpu_time": "", **extra}
        if baseline_of is not None:
            r["speedup"], r["speedup_cpu_time"] = med / baseline_of["median_s"], cpu / baseline_of["cpu_s"]
        rows.append(r)
        sp = "" if baseline_of is None else f"{r['speedup']:6.1f}x wall {r['speedup_cpu_time']:6.1f}x cpu"
        print(f"{case:<13} {impl:<70} {med:10.3f} s wall {cpu:10.3f} s cpu  {sp}", flush=True)
        return r

    def extrapolated(wall: list[float], cpu: float, n: int, total: int) -> tuple[list[float], float]:
        return [wall[0] / n * total], cpu / n * total

    # ---- the fusion op alone: T maps from the last stage (7x7 at 224), resized to 224 and min-max normalised --------
    from fastcbm.backends import backend_problem

    fw, fa = torch.randn(1, concepts, 2048, device=dev), torch.randn(1, 2048, 7, 7, device=dev)
    ref = None
    for b in ("reference", "cpu", "triton", "cuda"):
        if backend_problem(b, dev) is not None or (b == "triton" and dev.type == "cpu"):
            continue  # the Triton interpreter on CPU is a correctness tool, not timed
        wall, cpu = measure(lambda b=b: fuse(fw, fa, size=(224, 224), normalize=True, backend=b), 5)
        r = row("fuse", f"fuse backend={b}: {concepts} maps 7x7 -> 224x224, min-max", wall, cpu, concepts,
                baseline_of=None)
        if ref is None:
            ref = r
        else:
            r["speedup"], r["speedup_cpu_time"] = ref["median_s"] / r["median_s"], ref["cpu_s"] / r["cpu_s"]
            print(f"{'':<13} vs reference: {r['speedup']:.1f}x wall, {r['speedup_cpu_time']:.1f}x cpu", flush=True)
    if fuse_only:
        return rows

    # ---- regions ------------------------------------------------------------------------------------------------
    out: dict = {}
    def batched_regions() -> None:  # what concept_regions does, keeping the gradients for the association below
        out["grads"] = g = concept_grads(bb, translator, image, text, layers)
        out["b"] = {n: fuse(g.betas[n], g.maps[n]) for n in layers}

    wall, cpu = measure(batched_regions, 1 if dev.type == "cpu" else 5,
                        warmup=lambda: concept_regions(bb, translator, image, text[:2], layers))
    wall_l, cpu_l = measure(lambda: out.__setitem__("l", concept_regions(bb, translator, image, text[:n_loop], layers,
                                                                         method="loop")),
                            warmup=lambda: concept_regions(bb, translator, image, text[:1], layers, method="loop"))
    for p in bb.model.parameters():  # the authors' models have trainable parameters: backward computes their grads
        p.requires_grad_(True)
    wall_a, cpu_a = measure(lambda: [authors_regions(bb.model, translator, image, text[j:j + 1], layers)
                                     for j in range(n_loop)],
                            warmup=lambda: authors_regions(bb.model, translator, image, text[:1], layers))
    err = max(((out["b"][n][:, :n_loop] - out["l"][n]).abs().max() / out["l"][n].abs().max()).item() for n in layers)
    auth = authors_regions(bb.model, translator, image, text[:1], layers)
    err_auth = max(((out["b"][n][0, 0] - auth[n][0]).abs().max() / auth[n].abs().max()).item() for n in layers)
    for p in bb.model.parameters():
        p.requires_grad_(False)
    rb = row("regions", f"batched: 1 forward + min(T, D) = {min(concepts, d)} batched VJPs", wall, cpu, concepts,
             max_rel_err_vs_loop=err, max_rel_err_vs_authors=err_auth)
    row("regions", f"authors' loop: fwd + backward w/ param grads per concept (extrapolated from {n_loop})",
        *extrapolated(wall_a, cpu_a, n_loop, concepts), n_loop, baseline_of=rb)
    row("regions", f"fastcbm loop reference (extrapolated from {n_loop})", *extrapolated(wall_l, cpu_l, n_loop, concepts),
        n_loop, baseline_of=rb)

    # ---- association: all concepts x stages x (K + 1) steps, from the same gradients ---------------------------------
    grads = out["grads"]

    def subset(index) -> object:
        return type(grads)({n: v[:, index] for n, v in grads.betas.items()}, grads.maps, grads.z, grads.h,
                           grads.logits, grads.order, grads.layers)

    res: dict = {}
    wall, cpu = measure(lambda: res.__setitem__("b", association_scores(bb, translator, image, text, layers,
                                                                        top_k=top_k, grads=grads)), 3)
    # the loop scores each step against the whole concept set (the official softmax), like the batched op
    wall_l, cpu_l = measure(lambda: res.__setitem__("l", association_scores(
        bb, translator, image, text, layers, top_k=top_k, grads=subset(slice(0, n_loop)), method="loop")),
        warmup=lambda: None)
    err_a = ((res["b"][:, :n_loop] - res["l"]).abs().max() / res["l"].abs().max()).item()
    ra = row("association", f"batched: rank-1 prefix sums, {top_k + 1} steps x {len(layers)} stages", wall, cpu,
             concepts, max_rel_err_vs_loop=err_a)
    row("association", f"per-step loop (extrapolated from {n_loop})", *extrapolated(wall_l, cpu_l, n_loop, concepts),
        n_loop, baseline_of=ra)

    # ---- contribution: 8 concepts (the loop's first), each at a stage; every stage used -----------------------------
    top = torch.arange(8, device=dev)
    sel = text[top]
    chosen = res["b"][:, top].argmax(-1)
    chosen[0, : min(len(layers), 8)] = torch.arange(min(len(layers), 8), device=dev)
    wall, cpu = measure(lambda: res.__setitem__("cb", concept_contributions(
        bb, translator, image, sel, layers, chosen, top_k=top_k, grads=subset(top))), 1 if quick else 3)
    wall_l, cpu_l = measure(lambda: res.__setitem__("cl", concept_contributions(
        bb, translator, image, sel[:n_loop], layers, chosen[:, :n_loop], top_k=top_k,
        grads=subset(slice(0, n_loop)), method="loop")), warmup=lambda: None)
    scale = res["cl"].abs().max().item() or 1.0
    err_c = ((res["cb"][:, :n_loop] - res["cl"]).abs().max() / scale).item()
    stages = ",".join(str(int(c)) for c in chosen[0])
    rc = row("contribution", f"batched partial forward: {top_k} steps x 8 concepts at stages {stages}", wall, cpu, 8,
             max_rel_err_vs_loop=err_c)
    # per-step loop cost does not depend on the stage (a full forward per step); the loop's concepts sit at the
    # shallowest stages, where the batched partial forward saves the least
    row("contribution", f"per-step loop (extrapolated from {n_loop} concepts)", *extrapolated(wall_l, cpu_l, n_loop, 8),
        n_loop, baseline_of=rc)
    both_b = ([ra["median_s"] + rc["median_s"]], ra["cpu_s"] + rc["cpu_s"])
    rab = row("assoc+contrib", f"batched: association of {concepts} concepts + contribution of 8", *both_b, concepts)
    last = rows[-4], rows[-2]  # the two loop rows
    row("assoc+contrib", "per-step loops (extrapolated)", [last[0]["median_s"] + last[1]["median_s"]],
        last[0]["cpu_s"] + last[1]["cpu_s"], n_loop, baseline_of=rab)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="96 px input, 2 loop concepts")
    ap.add_argument("--concepts", type=int, default=1000)
    ap.add_argument("--size", type=int, default=None, help="input side (default 224; 96 with --quick)")
    ap.add_argument("--loop-concepts", type=int, default=None, help="concepts the loops run on (extrapolated)")
    ap.add_argument("--note", default=os.environ.get("FASTCBM_BENCH_NOTE", ""),
                    help="stored in every row (e.g. 'shared, loaded 2-core machine')")
    ap.add_argument("--fuse-only", action="store_true", help="time only the fusion op's backends")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    rows = run(args.quick, args.device, note=args.note, concepts=args.concepts, size=args.size,
               loop_concepts=args.loop_concepts, fuse_only=args.fuse_only)
    if not args.no_csv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _rows import append_rows

        append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
