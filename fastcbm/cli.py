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
from fastcbm.errors import EXIT_SYSTEM, EXIT_USER_ERROR, UserError

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
    "fastcbm.commands.salf",
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
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        # bad input (fastcbm.errors; a path that does not exist or is of the wrong kind): one line, exit 2
        if args.verbose >= 2:
            raise
        text = str(exc) if isinstance(exc, UserError) else _os_error_text(exc)
        print(f"fastcbm {args.command}: error: {text}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # the system refused: read-only folder (EROFS), full disk, I/O error, a writer's lock
        if args.verbose >= 2:
            raise
        print(f"fastcbm {args.command}: error: {_os_error_text(exc)}", file=sys.stderr)
        return EXIT_SYSTEM
    # anything else is a bug in fastcbm: it propagates with its traceback (exit 1)


def _os_error_text(exc: OSError) -> str:
    """``[Errno 30] Read-only file system: 'x'`` → ``Read-only file system: x`` (custom messages kept as they are)."""
    if exc.strerror and exc.filename:
        where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
        return f"{exc.strerror}: {where}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
