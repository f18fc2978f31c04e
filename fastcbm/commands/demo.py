"""``fastcbm demo``: the README's main job, SALF-CBM end to end on the synthetic testbed — the same command as
``fastcbm salf demo`` (same options, same defaults, from :class:`fastcbm.salf.demo.DemoConfig`). The other methods'
demos are ``fastcbm cefam demo`` and ``fastcbm deal demo``."""

from __future__ import annotations

import argparse

from fastcbm.commands.salf import DEMO_DESCRIPTION, DEMO_HELP, add_demo_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help=f"{DEMO_HELP} (= fastcbm salf demo)",
        description=f"{DEMO_DESCRIPTION} The same as 'fastcbm salf demo'; CE-FAM's and DEAL's demos are 'fastcbm "
                    "cefam demo' and 'fastcbm deal demo'.")
    add_demo_options(p)
