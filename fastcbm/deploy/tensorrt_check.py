"""GPU check: build and time TensorRT engines of an exported SALF-CBM (ResNet-50, random init, 224 px).

    python -m fastcbm.deploy.tensorrt_check --out DIR [--quick]

Exports the explained graph in fp32 and fp16, builds a strongly typed engine of each (profile batch 1..32, tuned at
batch 1), checks the fp32 engine's outputs against eager PyTorch (max abs diff) and the fp16 engine's logits against
fp32 (relative), times batch 1 and 32 (CUDA tensors in and out, CUDA graphs) against eager PyTorch and onnxruntime,
builds again to show the engine cache hit, and writes ``DIR/tensorrt_check.json``. Targets (issue 12): ResNet-50
SALF-CBM batch 1 ≤ 1 ms with TensorRT and ≥ 3× eager. Where ``import tensorrt`` fails it says so in one line, exit 2.

UNVERIFIED on the development machines (no GPU, no TensorRT): it runs in bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _time(fn, repeats: int) -> tuple[float, float]:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return statistics.median(ts), ts[min(len(ts) - 1, round(0.99 * (len(ts) - 1)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="fewer timing repeats")
    ap.add_argument("--backbone", default="resnet50")
    args = ap.parse_args(argv)

    from fastcbm.deploy.tensorrt import (
        TensorRTUnavailableError,
        import_tensorrt,
        trt_version,
    )

    try:
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailableError("no CUDA device: the TensorRT check needs one")
    except TensorRTUnavailableError as exc:
        print(f"tensorrt_check: {exc}", file=sys.stderr)
        return 2

    from fastcbm.deploy import build_engine, export_onnx, load
    from fastcbm.deploy.graph import ExplainedSALF
    from fastcbm.deploy.testing import (  # the models bench/deploy.py times
        BENCH_MODELS,
        random_salf,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "engine-cache"
    name, size, m, k = BENCH_MODELS.get(args.backbone, (args.backbone, 224, 512, 1000))
    model, bb = random_salf(name, m, k)
    report: dict = {"tensorrt": trt_version(trt), "gpu": torch.cuda.get_device_name(0), "backbone": name,
                    "input_size": size, "concepts": m, "classes": k}
    repeats = 50 if args.quick else 200
    dev = torch.device("cuda")
    onnx_paths = {p: export_onnx(model, args.out / f"salf-{name}-{p}.onnx", backbone=bb, max_batch=32, precision=p)
                  for p in ("fp32", "fp16")}  # both exported before the model moves to the GPU
    eager = ExplainedSALF(model, mean=bb.mean, std=bb.std).eval().to(dev)
    for precision, onnx_path in onnx_paths.items():
        t0 = time.perf_counter()
        engine = build_engine(onnx_path, args.out / f"salf-{name}-{precision}.engine", max_batch=32, opt_batch=1,
                              cache_dir=cache)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_engine(onnx_path, None, max_batch=32, opt_batch=1, cache_dir=cache)
        report[f"{precision}_build_s"], report[f"{precision}_cache_hit_s"] = build_s, time.perf_counter() - t0
        runner = load(engine, backend="tensorrt")
        for batch in (1, 32):
            x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dev)
            got = runner(x)
            with torch.inference_mode():
                ref = dict(zip(eager.outputs, eager(x)))
            if precision == "fp32":
                report[f"fp32_b{batch}_max_abs_diff"] = {n: float((got[n] - ref[n]).abs().max()) for n in ref}
            else:
                scale = float(ref["logits"].abs().max())
                report[f"fp16_b{batch}_logits_rel_diff"] = float((got["logits"] - ref["logits"]).abs().max()) / scale
            p50, p99 = _time(lambda runner=runner, x=x: runner(x), repeats)
            report[f"{precision}_b{batch}_trt_p50_ms"], report[f"{precision}_b{batch}_trt_p99_ms"] = p50 * 1e3, p99 * 1e3
            if precision == "fp32":
                with torch.inference_mode():
                    e50, _ = _time(lambda x=x: eager(x), repeats)
                report[f"b{batch}_eager_p50_ms"] = e50 * 1e3
    for batch in (1, 32):
        best = min(report[f"fp32_b{batch}_trt_p50_ms"], report[f"fp16_b{batch}_trt_p50_ms"])
        report[f"b{batch}_speedup_vs_eager"] = report[f"b{batch}_eager_p50_ms"] / best
    report["target_b1_le_1ms"] = min(report["fp32_b1_trt_p50_ms"], report["fp16_b1_trt_p50_ms"]) <= 1.0
    report["target_b1_ge_3x_eager"] = report["b1_speedup_vs_eager"] >= 3.0
    (args.out / "tensorrt_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
