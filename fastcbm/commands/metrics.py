"""``fastcbm metrics``: placeholder until the metrics op family lands."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("metrics", help="evaluate saliency maps against masks (NRA, EPG, hit rate)")
    p.set_defaults(func=lambda args: 0)
