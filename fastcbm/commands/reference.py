"""The command reference, generated from the parsers: ``python -m fastcbm.commands.reference`` prints it as Markdown
(a table of every command: how to call it with its required arguments, what it does, its other options; then the old
spellings and their new ones). The README's "Command line" section holds this text between the markers
``<!-- commands:start -->`` and ``<!-- commands:end -->``; ``python -m fastcbm.commands.reference --write README.md``
replaces it there, and tests/test_cli.py fails when the two differ, so the table cannot drift from the CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

START, END = "<!-- commands:start -->", "<!-- commands:end -->"
# options every command has, named once under the table instead of in every row
COMMON = ("-h", "--help", "-v", "--verbose", "--no-progress")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _shape(action: argparse.Action) -> str:
    """``--cache CACHE`` / ``IMAGE`` / ``--data KIND [PATH ...]``: how an argument is written."""
    if isinstance(action.metavar, tuple):
        value = " ".join(action.metavar)
    else:
        value = action.metavar or (action.dest.upper() if action.option_strings else action.dest.upper())
    if not action.option_strings:
        return value
    flag = max(action.option_strings, key=len)
    return flag if action.nargs == 0 else f"{flag} {value}"


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), help_text: str = ""):
    """``(path, parser, help)`` of every command that runs, in the order ``-h`` lists them."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        yield path, parser, help_text
        return
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    for name, child in sub.choices.items():
        yield from _leaves(child, (*path, name), helps.get(name, ""))


def command_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    """``(call, what it does, other options)`` per command."""
    rows = []
    for path, leaf, help_text in _leaves(parser):
        required, optional = [], []
        # one of a required group: "{--cache CACHE | --data DATA}", where the group's first member stands
        groups = {id(g._group_actions[0]): g._group_actions for g in leaf._mutually_exclusive_groups if g.required}
        members = {id(a) for acts in groups.values() for a in acts}
        for action in leaf._actions:
            if isinstance(action, argparse._HelpAction) or set(action.option_strings) & set(COMMON):
                continue
            if id(action) in groups:
                required.append("{" + " | ".join(_shape(a) for a in groups[id(action)]) + "}")
            elif id(action) in members:
                continue
            elif not action.option_strings:
                shape = _shape(action)
                required.append({"?": f"[{shape}]", "*": f"[{shape} ...]"}.get(action.nargs, shape))
            elif action.required:
                required.append(_shape(action))
            else:
                optional.append(max(action.option_strings, key=len))
        call = " ".join(["fastcbm", *path, *required])
        rows.append((call, help_text, " ".join(f"`{o}`" for o in optional)))
    return rows


def markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """The reference as Markdown (without the markers)."""
    from fastcbm.cli import build_parser
    from fastcbm.commands.aliases import ALIASES

    parser = parser or build_parser()
    lines = ["<!-- generated from the parsers by `python -m fastcbm.commands.reference`; do not edit by hand -->", "",
             "| command | what it does | other options |", "|---|---|---|"]
    lines += [f"| `{_cell(call)}` | {_cell(what)} | {_cell(opts)} |" for call, what, opts in command_rows(parser)]
    lines += ["", f"Every command also takes {', '.join(f'`{c}`' for c in ('-h', '-v', '-vv'))} and, where it shows "
              "progress, `--no-progress`. The old spellings still work and print one line naming the new one:", "",
              "| old spelling | new spelling |", "|---|---|"]
    lines += [f"| `{_cell(old)}` | `{_cell(new)}` |" for old, new in ALIASES]
    return "\n".join(lines) + "\n"


def replace_between_markers(text: str, body: str) -> str:
    """``text`` with what lies between :data:`START` and :data:`END` replaced by ``body``."""
    a, b = text.find(START), text.find(END)
    if a < 0 or b < a:
        raise ValueError(f"the markers {START} ... {END} are missing")
    return text[:a + len(START)] + "\n" + body + text[b:]


def between_markers(text: str) -> str:
    a, b = text.find(START), text.find(END)
    if a < 0 or b < a:
        raise ValueError(f"the markers {START} ... {END} are missing")
    return text[a + len(START):b].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcbm.commands.reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", type=Path, metavar="README", help="replace the text between the markers in this file")
    args = p.parse_args(argv)
    body = markdown()
    if args.write is None:
        sys.stdout.write(body)
        return 0
    from fastcbm.files import atomic_write_text

    atomic_write_text(args.write, replace_between_markers(args.write.read_text(), body))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
