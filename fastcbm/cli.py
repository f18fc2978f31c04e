"""The ``fastcbm`` command line. ``main(argv)`` is the testable entry point.

One shape for every method: ``fastcbm <method> <verb>`` with method ``salf`` | ``cefam`` | ``deal`` and verb
``train`` | ``evaluate`` | ``explain`` | ``demo``; the shared verbs (``precompute``, ``similarities``, ``export``,
``metrics``, ``testbed``, ``bench``, ``info``) are top level, and so is ``demo`` (the README's main job, SALF-CBM's
demo). Each command lives in its own module exposing ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``; modules are imported when the parser is built, so their top-level imports stay light (they
import torch-heavy code inside ``func``). The old spellings (``fastcbm train --method salf``, ``fastcbm demo --method
cefam``, ...) are rewritten to the new ones before parsing (:mod:`fastcbm.commands.aliases`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fastcbm import __version__
from fastcbm.commands import aliases, walk
from fastcbm.errors import EXIT_SYSTEM, EXIT_USER_ERROR, UserError

# command modules, in the order `fastcbm --help` lists them: the main job, the methods, then the shared verbs
COMMAND_MODULES = (
    "fastcbm.commands.demo",
    "fastcbm.commands.salf",
    "fastcbm.commands.cefam",
    "fastcbm.commands.deal",
    "fastcbm.commands.precompute",  # precompute and similarities
    "fastcbm.commands.export",
    "fastcbm.commands.metrics",
    "fastcbm.commands.testbed",
    "fastcbm.commands.bench",
    "fastcbm.commands.info",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcbm",
        description="Concept bottleneck models and concept explanations for vision models, fast. Methods: "
                    "'fastcbm salf|cefam|deal train|evaluate|explain|demo'.",
        epilog="Old spellings still work, with a one-line notice: 'fastcbm train|evaluate|explain [--method M]' is "
               "'fastcbm M train|evaluate|explain' (M: salf by default), 'fastcbm demo --method M' is "
               "'fastcbm M demo'.",
    )
    parser.add_argument("--version", action="version", version=f"fastcbm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for _path, sub, children in walk(parser):
        sub.set_defaults(command_prog=sub.prog)  # error lines name the command as typed: "fastcbm cefam train"
        if children is None and sub is not parser:  # `fastcbm salf train ... -vv` works too (added to the count)
            try:
                sub.add_argument("-v", "--verbose", action="count", default=0, dest="sub_verbose",
                                 help="more logging (-v info, -vv debug and tracebacks)")
            except argparse.ArgumentError:  # a command that defines its own -v keeps it
                pass
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, notice = aliases.rewrite(argv)
    except UserError as exc:
        print(f"{exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if notice:
        print(notice, file=sys.stderr)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(unknown_options_text(parser, args.command_prog, unknown), file=sys.stderr)
        return EXIT_USER_ERROR
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
        print(f"{args.command_prog}: error: {text}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # the system refused: read-only folder (EROFS), full disk, I/O error, a writer's lock
        if args.verbose >= 2:
            raise
        print(f"{args.command_prog}: error: {_os_error_text(exc)}", file=sys.stderr)
        return EXIT_SYSTEM
    # anything else is a bug in fastcbm: it propagates with its traceback (exit 1)


def unknown_options_text(parser: argparse.ArgumentParser, prog: str, unknown: list[str]) -> str:
    """One line for arguments ``prog`` does not take, naming the commands of the same verb that do (``--grid`` given
    to ``fastcbm cefam demo`` is an option of ``fastcbm salf demo``)."""
    verb = prog.split()[-1]
    flags = [t.split("=", 1)[0] for t in unknown if t.startswith("-")]
    owners = {}
    for path, sub, children in walk(parser):
        if children is None and len(path) == 2 and path[-1] == verb and sub.prog != prog:  # other methods' verb
            for flag in flags:
                if flag in sub._option_string_actions:
                    owners.setdefault(flag, []).append(sub.prog)
    where = "; ".join(f"{flag} is an option of {', '.join(progs)}" for flag, progs in owners.items())
    return (f"{prog}: error: unrecognized arguments: {' '.join(unknown)}" + (f" ({where})" if where else "")
            + f"; '{prog} -h' lists its options")


def _os_error_text(exc: OSError) -> str:
    """``[Errno 30] Read-only file system: 'x'`` → ``Read-only file system: x`` (custom messages kept as they are)."""
    if exc.strerror and exc.filename:
        where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
        return f"{exc.strerror}: {where}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
