"""Benchmark: which ``fastcbm precompute`` defaults are fastest on this machine's CPU, and that they change no byte.

Runs the real job (``fastcbm.precompute.precompute``: decode → ring prompts → tower → sharded cache) on the testbed
exported as an ImageFolder (the README's own-data handoff: ``fastcbm testbed export``), once per candidate setting of
images per batch and decoding workers, and reports wall time, images/s and whether the cache equals the first
setting's byte for byte (the batch size must not change the embeddings). The fastest byte-identical setting is what
``PrecomputeConfig`` picks on a CPU (``resolved_batch_size`` / ``resolved_num_workers``).

    python bench/precompute_defaults.py                 # 600 testbed scenes, the testbed CLIP, 7×7 grid
    python bench/precompute_defaults.py --quick         # 120 scenes
Rows are appended to bench/results/precompute_defaults.csv.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from _rows import append_rows

RESULTS = Path(__file__).resolve().parent / "results" / "precompute_defaults.csv"
# (batch_size, num_workers): the settings before this benchmark (4 images, min(4, cores) workers), then candidates
CANDIDATES = [(4, min(4, os.cpu_count() or 1)), (64, 0), (32, 0), (16, 0), (64, 2)]


def cache_digest(root: Path) -> str:
    """sha256 over every shard array file (names and bytes): equal digests mean equal caches."""
    h = hashlib.sha256()
    for p in sorted((root / "shards").rglob("*.npy")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="120 scenes instead of 600")
    ap.add_argument("--scenes", type=int, default=None)
    ap.add_argument("--note", default=os.environ.get("FASTCBM_BENCH_NOTE", ""), help="free text for the rows")
    args = ap.parse_args(argv)
    n = args.scenes or (120 if args.quick else 600)

    import torch

    from fastcbm.data import synthetic
    from fastcbm.data.export import export_image_folder
    from fastcbm.precompute import PrecomputeConfig, precompute

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = export_image_folder(synthetic.generate(n, seed=1_000_000), Path(tmp) / "data", masks=False)
        first = None
        for batch, workers in CANDIDATES:
            out = Path(tmp) / f"cache-{batch}-{workers}"
            cfg = PrecomputeConfig(batch_size=batch, num_workers=workers, device="cpu", progress=False)
            t0 = time.perf_counter()
            precompute(str(data), "testbed", out, cfg)
            wall = time.perf_counter() - t0
            digest = cache_digest(out)
            first = first or digest
            rows.append({"scenes": n, "batch_size": batch, "num_workers": workers, "wall_s": wall,
                         "images_per_s": n / wall, "identical_to_first": digest == first,
                         "torch_threads": torch.get_num_threads(), "note": args.note})
            print(f"batch {batch:3d}, workers {workers}: {wall:6.1f} s, {n / wall:6.1f} img/s, "
                  f"{'same bytes' if digest == first else 'DIFFERENT BYTES'}", flush=True)
    append_rows(RESULTS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
