"""``fastcbm bench [NAME ...] [--quick] [--device cpu|cuda] [--table]``: the benchmark runner (``python -m bench``).

The benchmarks live in the source checkout's ``bench/`` folder (they are not installed with the package); this
command finds that folder (the current directory's, or the one beside an editable install) and runs its runner.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fastcbm.errors import MissingFile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="run the benchmarks (same as `python -m bench` in a source checkout)",
        description="Runs the bench/ scripts of a source checkout, each against its same-run baseline, appending "
        "CSV rows tagged with the machine and versions to bench/results/.")
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all; see --list)")
    p.add_argument("--quick", action="store_true", help="short runs of every benchmark")
    p.add_argument("--device", choices=["cpu", "cuda"], help="device (default: cuda when a GPU is visible)")
    p.add_argument("--table", action="store_true", help="print the README benchmark table from the CSVs")
    p.add_argument("--write-readme", action="store_true", help="with --table: rewrite the table in README.md")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.add_argument("--keep-going", action="store_true", help="run the remaining benchmarks after a failure")
    p.add_argument("--note", default="", help="free text stored in every row (e.g. 'loaded machine')")
    p.set_defaults(func=run)


def runner_argv(args: argparse.Namespace) -> list[str]:
    argv = list(args.names)
    argv += [f"--{flag.replace('_', '-')}" for flag in ("quick", "table", "write_readme", "list", "keep_going")
             if getattr(args, flag)]
    argv += ["--device", args.device] if args.device else []
    argv += ["--note", args.note] if args.note else []
    return argv


def find_bench_dir() -> Path | None:
    import fastcbm

    for root in (Path.cwd(), Path(fastcbm.__file__).resolve().parents[1]):
        if (root / "bench" / "__main__.py").is_file():
            return root / "bench"
    return None


def run(args: argparse.Namespace) -> int:
    bench = find_bench_dir()
    if bench is None:
        raise MissingFile("the bench/ folder does not exist here: benchmarks run from a source checkout of "
                          "fastcbm (run this command in its root, or install it with `pip install -e .`)")
    return subprocess.call([sys.executable, "-m", "bench", *runner_argv(args)], cwd=bench.parent)
