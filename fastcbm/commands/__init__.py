"""Sub-commands of the ``fastcbm`` CLI (see fastcbm/cli.py)."""

from __future__ import annotations

import argparse


def help_without_subcommand(parser: argparse.ArgumentParser) -> None:
    """For a command that only groups sub-commands (``fastcbm cefam``, ``fastcbm deal``): called bare, it prints its
    help and exits 2."""
    def run(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=run)
