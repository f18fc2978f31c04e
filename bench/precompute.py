"""Benchmark: the precompute job (decode → ring prompts → CLIP image tower → cache) against a naive pipeline.

fastcbm: ``fastcbm.precompute.precompute`` (PIL decode once per image, one ``render_rings`` kernel call for all 1+G
copies of a batch, batched encoder, sharded fp16 cache writes).
naive: what unofficial SALF-CBM ports do: per prompt, copy the decoded PIL image, draw the ring with
``ImageDraw.ellipse``, run the torchvision transform (ToTensor + Normalize), then encode the 1+G copies of one image
as one batch and keep the results in memory, saving one .npy at the end.

Both run in the same process, on the same images, on the same device. Reported: end-to-end prompted images/s
(median and p10/p90 over ``--repeats`` runs), the speedup, and the breakdown of wall time into decode / render /
encode / write (+ setup: listing, model probe, manifest). The CPU target: everything except the encoder ≤ 5 % of
the wall time.

tower rows (``--tower``, pipeline ``tower:<mode>``): the image tower at its limit, without decoding or writing —
uint8 images already on the device, rendered by the ring kernel straight into the tower's input buffer in the
encoder's dtype and encoded (``fastcbm.precompute.tower.PromptTower``: eager autocast, CUDA graph, torch.compile).
Reported: prompted images/s and, for ViT-B/16 on a GPU, the fraction of the bf16 roofline (35.13 GFLOP per image
at the GPU's measured bf16 matmul rate: ≈ 22,500 images/s on an H100, docs/design.md §4); ``setup_s`` is the first
call (capture / compilation).

    python bench/precompute.py            # tiny config and testbed CLIP (64 px) on 24 images ×3, ViT-B/16 on 3
    python bench/precompute.py --quick    # 8 tiny images ×2, ViT-B/16 on 1 image
    python bench/precompute.py --device cuda --no-pipelines --tower eager graph compile   # the tower alone
Rows are appended to bench/results/precompute.csv.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from _timing import quantiles

import numpy as np
import torch
from _rows import append_rows

RESULTS = Path(__file__).resolve().parent / "results" / "precompute.csv"


def make_images(root: Path, n: int) -> list[str]:
    """``n`` ImageNet-like JPEGs (500×375 and 375×500, smooth noise so they compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        h, w = (375, 500) if i % 2 == 0 else (500, 375)
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        path = root / f"img{i:04d}.jpg"
        img.save(path, quality=90)
        files.append(str(path))
    return files


def load_model(kind: str):
    """(model, name): "testbed" (the bundled 1.6 M-parameter testbed CLIP), "tiny" (docs/design.md §4's tiny open_clip
    config: ViT, 4 layers, width 192, 64 px, 9.1 M parameters, random init) or "vit-b-16" (random init)."""
    from fastcbm.compat import import_open_clip

    oc = import_open_clip()
    torch.manual_seed(0)
    if kind == "vit-b-16":
        return oc.create_model("ViT-B-16", pretrained=None).eval(), "ViT-B-16 (random init)"
    if kind == "testbed":
        from fastcbm.models import load_clip

        model, _, _ = load_clip("testbed", None)
        return model.eval(), "testbed"
    model = oc.model.CLIP(embed_dim=128, vision_cfg={"image_size": 64, "patch_size": 8, "width": 192, "layers": 4,
                                                     "head_width": 64},
                          text_cfg={"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1})
    return model.eval(), "tiny random (4L w192 64px)"


def naive(files: list[str], model, size: int, mean, std, grid: int, radius: float, width: float, out: Path,
          device: str = "cpu") -> dict:
    """Per-prompt PIL drawing + per-image transforms + one encoder batch per image."""
    from PIL import Image, ImageDraw

    from fastcbm.compat import import_torchvision
    from fastcbm.prompts import ring_centers

    tv = import_torchvision()
    T = tv.transforms
    crop = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    centers = ring_centers(size, grid, radius, "inset").tolist()
    t = {"decode": 0.0, "render": 0.0, "encode": 0.0, "write": 0.0}
    rows = []
    t_all = time.perf_counter()
    for f in files:
        t0 = time.perf_counter()
        img = crop(Image.open(f).convert("RGB"))
        t1 = time.perf_counter()
        copies = [to_tensor(img)]
        for cy, cx in centers:
            p = img.copy()
            ImageDraw.Draw(p).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=(255, 0, 0),
                                      width=int(width))
            copies.append(to_tensor(p))
        x = torch.stack(copies).to(device)
        t2 = time.perf_counter()
        with torch.no_grad():
            e = model.encode_image(x)
            e = (e / e.norm(dim=-1, keepdim=True)).half().cpu().numpy()
        t3 = time.perf_counter()
        rows.append(e)
        t["decode"] += t1 - t0
        t["render"] += t2 - t1
        t["encode"] += t3 - t2
    t0 = time.perf_counter()
    np.save(out / "naive.npy", np.stack(rows))
    t["write"] += time.perf_counter() - t0
    t["wall"] = time.perf_counter() - t_all
    return t


def fast(files: list[str], model, name: str, grid: int, out: Path, batch_size: int, max_encode_batch=None,
         num_workers: int = 0, draft: bool = False, device: str = "cpu") -> dict:
    from fastcbm.precompute import precompute

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = precompute(files, model, out, model_name=name, grid=grid, batch_size=batch_size, shard_size=1024,
                   num_workers=num_workers, device=device, progress=False, max_encode_batch=max_encode_batch,
                   draft=draft)
    wall = time.perf_counter() - t0
    s = dict(r.stats)
    s["setup"] = wall - s["wall"]
    s["wall"] = wall
    return s



def run_case(kind: str, n_images: int, repeats: int, grid: int, batch_size: int, work: Path,
             meb: int | None, num_workers: int = 0, draft: bool = False, device: str = "cpu") -> list[dict]:
    from _env import VIT_B16_GFLOPS, roofline_fraction

    from fastcbm.models.inputs import encoder_input_config
    from fastcbm.prompts import default_ring_geometry

    model, name = load_model(kind)
    model = model.to(device)
    size, mean, std = encoder_input_config(model)
    radius, width = default_ring_geometry(size)
    files = make_images(work / "images", n_images)
    prompted = n_images * (1 + grid * grid)
    # warm-up (first-call allocations, lazy imports) on one image, both pipelines
    fast(files[:1], model, name, grid, work / "warm", batch_size, device=device)
    naive(files[:1], model, size, mean, std, grid, radius, width, work, device)
    runs: dict[str, list[dict]] = {"fastcbm": [], "naive": []}
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        runs["fastcbm"].append(fast(files, model, name, grid, work / "cache", batch_size, meb, num_workers, draft,
                                    device))
        runs["naive"].append(naive(files, model, size, mean, std, grid, radius, width, work, device))
    rows = []
    base = statistics.median(prompted / r["wall"] for r in runs["naive"])
    for pipe, rs in runs.items():
        med, p10, p90 = quantiles([prompted / r["wall"] for r in rs])
        mid = sorted(rs, key=lambda r: r["wall"])[len(rs) // 2]
        non_enc = (mid["wall"] - mid["encode"]) / mid["wall"]
        rows.append({"model": name, "image_size": size, "grid": grid, "max_encode_batch": meb or "auto",
                     "num_workers": num_workers if pipe == "fastcbm" else 0, "jpeg_draft": draft and pipe == "fastcbm",
                     "images": n_images, "prompted": prompted,
                     "repeats": repeats, "pipeline": pipe, "prompted_per_s": med, "p10": p10, "p90": p90,
                     "images_per_s": med / (1 + grid * grid), "speedup_vs_naive": med / base,
                     "wall_s": mid["wall"], "decode_s": mid["decode"], "render_s": mid["render"],
                     "encode_s": mid["encode"], "write_s": mid["write"], "setup_s": mid.get("setup", 0.0),
                     "non_encoder_frac": non_enc,
                     # ViT-B/16 only (its FLOPs are known): achieved FLOP/s over the GPU's measured bf16 peak
                     "roofline_frac": (roofline_fraction(med * VIT_B16_GFLOPS * 1e9)
                                       if kind == "vit-b-16" and device == "cuda" else "")})
    return rows


def tower_case(kind: str, n_images: int, repeats: int, grid: int, device: str, modes: list[str],
               max_encode_batch: int | None) -> list[dict]:
    """Render + encode of uint8 images already on ``device``, per tower mode (see the module docstring)."""
    from _env import VIT_B16_GFLOPS, roofline_fraction

    from fastcbm.precompute import encoder_input_config
    from fastcbm.precompute.tower import PromptTower
    from fastcbm.prompts import default_ring_geometry, render_rings

    dev = torch.device(device)
    model, name = load_model(kind)
    model = model.to(dev)
    size, mean, std = encoder_input_config(model)
    radius, width = default_ring_geometry(size)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    copies = 1 + grid * grid
    meb = max_encode_batch or (1024 if dev.type == "cuda" else copies)
    images = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(dev)

    def render(imgs, out):
        return render_rings(imgs, grid=grid, radius=radius, width=width, mean=mean, std=std, out_dtype=dtype,
                            include_plain=True, out=out)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    rows, eager = [], None
    for mode in modes:
        tower = PromptTower(model, render, copies=copies, size=size, device=dev, dtype=dtype, max_encode_batch=meb,
                            mode=mode)
        t0 = time.perf_counter()
        tower(images)  # the first call: capture / compilation / autotuning
        sync()
        setup = time.perf_counter() - t0
        walls = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            tower(images)
            sync()
            walls.append(time.perf_counter() - t0)
        med, p10, p90 = quantiles([n_images * copies / w for w in walls])
        eager = med if mode == "eager" else eager
        roof = (roofline_fraction(med * VIT_B16_GFLOPS * 1e9) if kind == "vit-b-16" and dev.type == "cuda"
                else None)
        rows.append({"model": name, "image_size": size, "grid": grid, "max_encode_batch": meb, "images": n_images,
                     "prompted": n_images * copies, "repeats": repeats, "pipeline": f"tower:{mode}",
                     "encoder_dtype": str(dtype).replace("torch.", ""), "prompted_per_s": med, "p10": p10,
                     "p90": p90, "images_per_s": med / copies, "wall_s": statistics.median(walls),
                     "setup_s": setup, "speedup_vs_eager": med / eager if eager else "",
                     "roofline_frac": "" if roof is None else roof})
        print(f"tower {name} {mode:<8} {med:>10.1f} prompted img/s (p10 {p10:.1f}, p90 {p90:.1f}); first call "
              f"{setup:.1f} s" + ("" if roof is None else f"; {100 * roof:.1f} % of the bf16 roofline"))
    return rows


def main(argv: list[str] | None = None) -> int:
    import fastcbm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="encoder device (default: cuda when available)")
    ap.add_argument("--grid", type=int, default=7)
    ap.add_argument("--tiny-images", type=int, default=None)
    ap.add_argument("--vit-images", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="images per batch (default 4 on CPU, 32 on GPU)")
    ap.add_argument("--skip-vit", action="store_true", help="only the small models (tiny config, testbed)")
    ap.add_argument("--num-workers", type=int, default=0,
                    help="fastcbm decoding worker processes (default 0: decode in the main process, as the naive "
                         "pipeline does; with workers, decoding overlaps the encoder)")
    ap.add_argument("--jpeg-draft", action="store_true", help="fastcbm: JPEG draft-mode decoding (precompute --jpeg-draft)")
    ap.add_argument("--max-encode-batch", default=None,
                    help="fastcbm encoder batch: 'same' = 1+G like the naive pipeline (isolates the pipeline "
                         "overhead; the CPU default), 'auto' = precompute's default (the GPU default: a GPU is "
                         "filled by large batches, which is the point of the fused pipeline), or a number")
    ap.add_argument("--tower", nargs="+", default=None, choices=["eager", "graph", "compile", "none"],
                    help="tower rows to measure (default: eager graph compile on a GPU, eager on CPU; none: skip)")
    ap.add_argument("--tower-images", type=int, default=None,
                    help="images per tower call (default 256 on a GPU = 12,800 prompted; 2 on CPU)")
    ap.add_argument("--no-pipelines", action="store_true", help="only the tower rows (no end-to-end comparison)")
    args = ap.parse_args(argv)
    gpu_run = args.device == "cuda"
    args.batch_size = args.batch_size or (32 if gpu_run else 4)
    args.max_encode_batch = args.max_encode_batch or ("auto" if gpu_run else "same")
    tiny_n = args.tiny_images or (8 if args.quick else 24)
    # a GPU needs enough prompted images to fill it: 64 images = 3,200 ViT-B/16 passes (quick), 512 = 25,600
    vit_n = args.vit_images or ((64 if args.quick else 512) if args.device == "cuda" else (1 if args.quick else 3))
    reps = args.repeats or (2 if args.quick else 3)
    cases = [("tiny", tiny_n, reps), ("testbed", tiny_n, reps)]
    cases += [] if args.skip_vit else [("vit-b-16", vit_n, 1 if args.quick else 2)]
    cases = [] if args.no_pipelines else cases
    modes = args.tower or (["eager", "graph", "compile"] if gpu_run else ["eager"])
    modes = [] if "none" in modes else modes
    tower_kind = "tiny" if args.skip_vit else "vit-b-16"
    tower_n = args.tower_images or (256 if gpu_run else 2)
    hw = platform.processor() or platform.machine()
    try:
        hw = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": hw, "gpu": gpu,
            "device": args.device, "quick": args.quick, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "fastcbm": fastcbm.__version__}
    rows = []
    meb = {"same": 1 + args.grid * args.grid, "auto": None}.get(args.max_encode_batch)
    meb = meb if args.max_encode_batch in ("same", "auto") else int(args.max_encode_batch)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, n, r in cases:
            rows += run_case(kind, n, r, args.grid, args.batch_size, Path(tmp) / kind, meb, args.num_workers,
                             args.jpeg_draft, args.device)
    tower_rows = tower_case(tower_kind, tower_n, reps, args.grid, args.device, modes,
                            None if args.max_encode_batch in ("same", "auto") else int(args.max_encode_batch)) \
        if modes else []
    print(f"precompute on {hw} ({torch.get_num_threads()} threads), torch {torch.__version__}, grid {args.grid}")
    head = (f"{'model':<28} {'pipeline':<8} {'imgs':>4} {'prompted/s':>10} {'p10':>8} {'p90':>8} {'speedup':>7} "
            f"{'wall':>7} {'decode':>7} {'render':>7} {'encode':>7} {'write':>6} {'setup':>6} {'non-enc':>7}")
    print(head)
    for row in rows:
        print(f"{row['model']:<28} {row['pipeline']:<8} {row['images']:>4} {row['prompted_per_s']:>10.1f} "
              f"{row['p10']:>8.1f} {row['p90']:>8.1f} {row['speedup_vs_naive']:>6.2f}x {row['wall_s']:>7.2f} "
              f"{row['decode_s']:>7.3f} {row['render_s']:>7.3f} {row['encode_s']:>7.2f} {row['write_s']:>6.3f} "
              f"{row['setup_s']:>6.3f} {100 * row['non_encoder_frac']:>6.1f}%")
    append_rows(RESULTS, [{**meta, **row} for row in rows + tower_rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
