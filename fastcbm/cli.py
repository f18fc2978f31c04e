"""The ``fastcbm`` command line. ``main(argv)`` is the testable entry point.

Each sub-command lives in its own module exposing ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Modules are imported when the parser is built; keep their top-level imports light (import
torch-heavy code inside ``func``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fastcbm import __version__
from fastcbm.compat import WeightsUnavailableError

# command modules, in the order `fastcbm --help` lists them
COMMAND_MODULES = (
    "fastcbm.commands.bench",
    "fastcbm.commands.cefam",
    "fastcbm.commands.deal",
    "fastcbm.commands.demo",
    "fastcbm.commands.evaluate",
    "fastcbm.commands.explain",
    "fastcbm.commands.export",
    "fastcbm.commands.info",
    "fastcbm.commands.metrics",
    "fastcbm.commands.precompute",
    "fastcbm.commands.testbed",
    "fastcbm.commands.train",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcbm",
        description="Concept bottleneck models and concept explanations for vision models, fast.",
    )
    parser.add_argument("--version", action="version", version=f"fastcbm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for sub in subparsers.choices.values():  # `fastcbm train ... -vv` works too (added to the global count)
        try:
            sub.add_argument("-v", "--verbose", action="count", default=0, dest="sub_verbose",
                             help="more logging (-v info, -vv debug and tracebacks)")
        except argparse.ArgumentError:  # a command that defines its own -v keeps it
            pass
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose += getattr(args, "sub_verbose", 0) or 0
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, WeightsUnavailableError) as exc:
        # user errors: one clear line, no traceback (use -vv for one)
        if args.verbose >= 2:
            raise
        print(f"fastcbm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # read-only folders (EROFS), full disks, a cache's writer lock, I/O errors: one line
        if args.verbose >= 2:
            raise
        print(f"fastcbm {args.command}: error: {_os_error_text(exc)}", file=sys.stderr)
        return 1


def _os_error_text(exc: OSError) -> str:
    """``[Errno 30] Read-only file system: 'x'`` → ``Read-only file system: x`` (custom messages kept as they are)."""
    if exc.strerror and exc.filename:
        where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
        return f"{exc.strerror}: {where}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
