"""Benchmark: an exported SALF-CBM (one graph that predicts and explains) on eager PyTorch, onnxruntime and TensorRT.

    python bench/deploy.py                  # CPU: testbed CNN (64 px) and ResNet-50 (224 px, random init), batch 1 and 32
    python bench/deploy.py --device cuda    # GPU: the same with onnxruntime's CUDA provider and TensorRT where installed
    python bench/deploy.py --quick          # well under a minute on 2 CPU cores (ResNet-50 at batch 1 only)

For every (model, batch, backend) it times the explained graph (logits, concepts, concept_maps, contributions) and
the bare classifier (logits only) built from the same weights: latency p50/p99, images/s, the speed-up against eager
PyTorch in the same run, and the explanation's cost = explained p50 / logits-only p50 (target ≤ 1.1×). CPU target:
onnxruntime ≥ 1.3× eager PyTorch for the ResNet-50 SALF-CBM at batch 1. TensorRT rows say why they were skipped where
``import tensorrt`` fails. Rows go to bench/results/deploy.csv (``_rows.append_rows`` tags the machine; on the shared
development box the CPU is loaded by other jobs — say so with ``--note``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "deploy.csv"


def make_model(backbone_name: str, m: int, k: int, seed: int = 0):
    from fastcbm.deploy.testing import random_salf

    return random_salf(backbone_name, m, k, seed=seed)


def timed(fn, repeats: int, sync=None, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return out


def timed_pair(bare, explained, x, repeats: int, sync=None) -> dict[str, list[float]]:
    """Interleaved timings of the logits-only and the explained graph (alternating which goes first), so drifting
    load on a shared machine hits both alike and their ratio stays meaningful."""
    out: dict[str, list[float]] = {"logits": [], "explained": []}
    fns = {"logits": bare, "explained": explained}
    for fn in fns.values():  # warm-up
        fn(x)
    for i in range(repeats):
        for name in (("logits", "explained") if i % 2 == 0 else ("explained", "logits")):
            out[name] += timed(lambda name=name: fns[name](x), 1, sync, warmup=0)
    return out


def p50_p99(times: list[float]) -> tuple[float, float]:
    s = sorted(times)
    return statistics.median(s), s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


def _runners(graphs: dict, onnx_paths: dict, device: torch.device, threads: int):
    """{backend: {variant: callable(images)} or a skip reason (str)}."""
    from fastcbm.deploy.runtime import OnnxRuntimeRunner, TensorRTRunner
    from fastcbm.deploy.tensorrt import TensorRTUnavailableError, import_tensorrt

    out: dict = {}

    def eager(g):
        def fn(x):
            with torch.inference_mode():
                return g(x)
        return fn

    out["eager"] = {v: eager(g.to(device)) for v, g in graphs.items()}
    try:
        out["onnxruntime"] = {v: OnnxRuntimeRunner(p, device=str(device), threads=threads)
                              for v, p in onnx_paths.items()}
        if device.type == "cuda" and out["onnxruntime"]["explained"].backend != "onnxruntime-cuda":
            out["onnxruntime"] = "onnxruntime has no CUDA execution provider here (pip install onnxruntime-gpu)"
    except Exception as exc:  # noqa: BLE001 - a benchmark row says why instead of stopping the run
        out["onnxruntime"] = f"onnxruntime failed: {str(exc).splitlines()[0][:150]}"
    try:
        import_tensorrt()
        if device.type != "cuda":
            raise TensorRTUnavailableError("TensorRT runs on CUDA only (this run is --device cpu)")
        out["tensorrt"] = {v: TensorRTRunner(p, cuda_graphs=True) for v, p in onnx_paths.items()}
    except Exception as exc:  # noqa: BLE001
        out["tensorrt"] = str(exc).splitlines()[0][:200]
    return out


def run(quick: bool, device: str, note: str = "", threads: int | None = None) -> list[dict]:
    """Time every (model, batch, backend); return the CSV rows."""
    from fastcbm.deploy import export_onnx
    from fastcbm.deploy.graph import ExplainedSALF

    dev = torch.device(device)
    threads = threads or torch.get_num_threads()
    plan = [("testbed", (1, 32)), ("resnet50", (1,) if quick else (1, 32))]
    rows: list[dict] = []
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="fastcbm-bench-deploy-") as tmp:
        for key, batches in plan:
            from fastcbm.deploy.testing import BENCH_MODELS

            name, size, m, k = BENCH_MODELS[key]
            model, bb = make_model(name, m, k)
            graphs = {"explained": ExplainedSALF(model, mean=bb.mean, std=bb.std).eval(),
                      "logits": ExplainedSALF(model, mean=bb.mean, std=bb.std, outputs=("logits",)).eval()}
            t0 = time.perf_counter()
            paths = {v: export_onnx(model, Path(tmp) / f"{key}-{v}.onnx", backbone=bb, max_batch=max(batches),
                                    outputs=g.outputs) for v, g in graphs.items()}
            print(f"{key}: exported 2 graphs in {time.perf_counter() - t0:.1f} s", flush=True)
            runners = _runners(graphs, paths, dev, threads)
            for batch in batches:
                images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dev)
                heavy = key == "resnet50" and dev.type == "cpu"  # ~0.1 s per image on 2 cores
                repeats = (5 if heavy else 20) if quick else (5 if heavy and batch > 1 else 30)
                base = None
                for backend, r in runners.items():
                    if isinstance(r, str):
                        rows.append({"model": key, "input_size": size, "concepts": m, "classes": k, "batch": batch,
                                     "backend": backend, "outputs": "explained", "skipped": r})
                        print(f"{key:<9} b={batch:<3} {backend:<12} skipped: {r}")
                        continue
                    x = images if backend != "onnxruntime" or dev.type == "cuda" else images.cpu().numpy()
                    times = timed_pair(r["logits"], r["explained"], x, repeats, sync)
                    res = {v: p50_p99(t) for v, t in times.items()}
                    p50, p99 = res["explained"]
                    if backend == "eager":
                        base = p50
                    row = {"model": key, "input_size": size, "concepts": m, "classes": k, "batch": batch,
                           "backend": getattr(r["explained"], "backend", backend), "outputs": "explained",
                           "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "images_per_s": batch / p50,
                           "logits_only_p50_ms": res["logits"][0] * 1e3,
                           "explain_cost": p50 / res["logits"][0],
                           "speedup_vs_eager": (base / p50) if base else "", "repeats": repeats,
                           "threads": threads, "quick": quick, "load_note": note, "skipped": ""}
                    rows.append(row)
                    vs = f"{base / p50:.2f}x" if base else "-"
                    print(f"{key:<9} b={batch:<3} {row['backend']:<16} p50 {p50 * 1e3:9.2f} ms  p99 {p99 * 1e3:9.2f} ms"
                          f"  {batch / p50:9.1f} img/s  explain cost {row['explain_cost']:.3f}x  vs eager {vs}",
                          flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="ResNet-50 at batch 1 only, fewer repeats (< 1 min on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    ap.add_argument("--note", default=os.environ.get("FASTCBM_BENCH_NOTE", ""),
                    help="stored in every row (e.g. 'shared, loaded 2-core machine')")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.quick, args.device, note=args.note, threads=args.threads)
    if not args.no_csv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _rows import append_rows

        append_rows(RESULTS, [{"bench": "deploy", "device": args.device, **r} for r in rows])


if __name__ == "__main__":
    main()
