"""CE-FAM evaluation throughput (Broden-style: every image with its present concepts, regions at every stage, the
layer association over the whole concept set, NRA/EPG per pair): fastcbm's batched evaluation vs the authors' way in
the same run (one image at a time, one forward + backward per concept, one translator forward per masking step:
``method="loop"``, batch 1), on fresh testbed scenes with the bundled CNN and a translator (the demo's trained one when
``--model`` is given, else random init: the speed does not depend on the weights).

    python bench/cefam_eval.py [--images 64] [--loop-images 2] [--model DIR] [--note "..."]

Rows go to ``bench/results/cefam_eval.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "cefam_eval.csv"


def _model(model_dir: str | None):
    from fastcbm.cefam.model import CEFAM, CEFAMConfig, load_cefam
    from fastcbm.cefam.translator import Translator
    from fastcbm.models import load_backbone

    if model_dir:
        return load_cefam(model_dir)
    torch.manual_seed(0)
    layers = ["layer1", "layer2", "layer3", "layer4"]
    translator = Translator(160, 128).eval()
    return CEFAM(load_backbone("testbed"), translator, CEFAMConfig(layers=layers, embed_dim=128, in_features=160,
                                                                    hidden=list(translator.hidden),
                                                                    widths=[16, 32, 48, 64]))


def run(images: int = 64, loop_images: int = 2, model_dir: str | None = None, note: str = "",
        threads: int = 1, device: str = "cpu", quick: bool = False) -> list[dict]:
    from fastcbm.cefam.datasets import TestbedDataset
    from fastcbm.cefam.evaluate import EvalConfig, encode_concepts, evaluate_cefam
    from fastcbm.models import load_clip
    from fastcbm.utils import torch_threads

    rows = []
    with torch_threads(threads):
        model = _model(model_dir).to(device)
        clip, _, tok = load_clip("testbed")
        fast_ds, loop_ds = TestbedDataset(images), TestbedDataset(loop_images)
        text = encode_concepts(clip, tok, fast_ds)
        for name, ds, cfg in (("batched", fast_ds, EvalConfig(batch_size=16, baseline=False, progress=False,
                                                                     device=device)),
                              ("authors' loop", loop_ds, EvalConfig(batch_size=1, method="loop", baseline=False,
                                                                    progress=False, device=device))):
            t0, c0 = time.perf_counter(), time.process_time()
            res = evaluate_cefam(model, ds, text_emb=text, config=cfg)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows.append({"bench": "cefam_eval", "method": name, "images": res["images"], "pairs": res["pairs"],
                         "concepts": res["concepts"], "wall_s": wall, "cpu_s": cpu,
                         "images_per_s": res["images"] / wall, "pairs_per_s": res["pairs"] / wall,
                         "threads": threads, "note": note, "device": device, "quick": quick})
            print(f"{name}: {res['images']} images, {res['pairs']} pairs in {wall:.1f} s "
                  f"({res['images'] / wall:.3f} images/s, process CPU {cpu:.1f} s)")
    rows[0]["speedup_vs_loop"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    print(f"batched / loop: {rows[0]['speedup_vs_loop']:.1f}x images/s")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None, help="testbed scenes for the batched evaluation (64; quick 16)")
    ap.add_argument("--quick", action="store_true", help="16 scenes batched, 1 in the loop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--loop-images", type=int, default=None, help="testbed scenes for the loop baseline (2; quick 1)")
    ap.add_argument("--model", default=None, help="a saved CE-FAM model folder (default: random translator)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default=os.environ.get("FASTCBM_BENCH_NOTE", ""))
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    images = args.images or (16 if args.quick else 64)
    loop_images = args.loop_images or (1 if args.quick else 2)
    rows = run(images, loop_images, args.model, args.note, args.threads, args.device, args.quick)
    if not args.no_csv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _rows import append_rows

        append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
