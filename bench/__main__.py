"""One runner for every benchmark.

    python -m bench                      # every benchmark, full size, on the default device
    python -m bench metrics deploy       # some of them
    python -m bench --quick              # short runs (minutes in all on 2 CPU cores)
    python -m bench --device cuda        # on the GPU
    python -m bench --table              # print the README's benchmark table from bench/results/*.csv
    python -m bench --table --write-readme   # and rewrite it in README.md (a test checks they agree)
    python -m bench --list

Each benchmark runs as its own process (``python bench/<name>.py [--quick] [--device D]``), so one that fails or
runs out of memory does not take the others down; each appends CSV rows tagged with the machine, versions and date
to ``bench/results/<name>.csv`` (``bench/_rows.py``). ``fastcbm bench`` is the same runner.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# every benchmark in the order the runner and the README table list them; a script here that is missing is skipped
BENCHMARKS = {
    "metrics": "NRA / EPG backends vs the authors' per-pixel loop",
    "losses": "fused cubic-cosine loss vs the materialised reference (time, peak memory)",
    "precompute": "ring-prompt precompute vs a naive PIL pipeline (images/s, % outside the encoder, % of roofline)",
    "deploy": "exported SALF-CBM: eager PyTorch vs onnxruntime vs TensorRT latency; cost of the explanation outputs",
    "cefam": "CE-FAM regions / association / contribution, batched vs the authors' per-concept loops",
    "cefam_eval": "CE-FAM Broden-style evaluation throughput (images/s with their present concepts) vs the authors' way",
    "deal": "DEAL training step vs plain contrastive fine-tuning (time, peak memory)",
}


def available() -> list[str]:
    return [n for n in BENCHMARKS if (HERE / f"{n}.py").is_file()]


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def run_one(name: str, quick: bool, device: str, extra: list[str], note: str) -> tuple[int, float]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--device", device, *(["--quick"] if quick else []), *extra]
    env = {**os.environ, "FASTCBM_BENCH_NOTE": note, "PYTHONPATH": os.pathsep.join(
        p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)}
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=env)
    return rc, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {available()})")
    ap.add_argument("--quick", action="store_true", help="short runs of every benchmark")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="device to benchmark on (default: cuda when a GPU is visible, else cpu)")
    ap.add_argument("--note", default="", help="free text stored in every row's load_note column (e.g. 'loaded')")
    ap.add_argument("--table", action="store_true", help="print the README benchmark table from the CSVs; run nothing")
    ap.add_argument("--write-readme", action="store_true", help="with --table: rewrite the table in README.md")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--keep-going", action="store_true", help="run the remaining benchmarks after a failure")
    args, extra = ap.parse_known_args(argv)

    names = args.names or available()
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    missing = [n for n in names if n not in available()]
    if missing and args.names:
        ap.error(f"benchmark(s) {missing} have no script in {HERE}")
    if args.list:
        for n in BENCHMARKS:
            print(f"{n:<12} {'' if n in available() else '(no script yet) '}{BENCHMARKS[n]}")
        return 0
    if args.table:
        sys.path.insert(0, str(HERE))
        import _table

        names = [n for n in BENCHMARKS if n in names]
        if args.write_readme:
            readme = HERE.parent / "README.md"
            changed = _table.replace_in_readme(readme, names)
            print(f"{'rewrote' if changed else 'unchanged:'} the benchmark table in {readme}")
        else:
            print(_table.table(names))
        return 0
    if extra:
        ap.error(f"unrecognized arguments {extra}")  # per-script options: run `python bench/<name>.py ...`

    device = args.device or default_device()
    results: list[tuple[str, int, float]] = []
    for name in [n for n in names if n in available()]:
        rc, secs = run_one(name, args.quick, device, [], args.note)
        results.append((name, rc, secs))
        if rc != 0 and not args.keep_going:
            break
    print("\n=== summary")
    for name, rc, secs in results:
        print(f"{name:<12} {'ok' if rc == 0 else f'FAILED (exit {rc})':<16} {secs:8.1f} s")
    print("rows appended under bench/results/; `python -m bench --table` shows the README table")
    return 0 if all(rc == 0 for _, rc, _ in results) and len(results) == len([n for n in names if n in available()]) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
