"""Sub-commands of the ``fastcbm`` CLI (see fastcbm/cli.py) and the pieces they share.

Every method has one module with its four verbs (``salf``, ``cefam``, ``deal``: ``train``, ``evaluate``, ``explain``,
``demo``); the shared verbs (``precompute``, ``similarities``, ``export``, ``metrics``, ``testbed``, ``bench``,
``info``) have theirs. Options whose value is a setting of a config dataclass are added with :func:`config_option`,
which reads the default from the dataclass, so the CLI, the Python API and the demos share one set of defaults; the
run function turns them back into the dataclass with :func:`config_from_args`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from fastcbm.errors import InvalidArgument

# the method a model folder belongs to, by its config.json "format" field (what each method's save writes: SALFCBM.save,
# fastcbm.cefam.model.FORMAT, fastcbm.deal.train.FORMAT; tests/test_cli.py keeps these equal)
FOLDER_FORMATS = {"fastcbm.salf": "salf", "fastcbm.cefam": "cefam", "fastcbm-deal": "deal"}
METHOD_NAMES = {"salf": "SALF-CBM", "cefam": "CE-FAM", "deal": "DEAL"}
CONFIG_FIELDS = "config_fields"  # the Namespace attribute listing the options that are config fields


def help_without_subcommand(parser: argparse.ArgumentParser) -> None:
    """For a command that only groups sub-commands (``fastcbm salf``, ``fastcbm cefam``, ``fastcbm deal``): called
    bare, it prints its help and exits 2."""
    def run(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=run)


def config_option(parser: argparse.ArgumentParser, defaults: Any, name: str, help: str, *, flag: str | None = None,
                  show_default: bool = True, group: argparse._ArgumentGroup | None = None, **kwargs: Any) -> None:
    """Add the option for the dataclass field ``name`` of ``defaults`` (an instance: its value is the default).

    The flag is ``--name-with-dashes`` unless given; the type is the default's (``kwargs['type']`` for a ``None``
    default). A boolean field that is off by default becomes a switch ``--name``, one that is on becomes ``--no-name``
    (store_false). ``help`` gets ``(default X)`` appended unless ``show_default=False``. The field's name is recorded
    on the parser (:func:`config_from_args` and the defaults test read it); ``group``: list it under this argument
    group of ``parser`` in ``-h``."""
    default = getattr(defaults, name)
    if isinstance(default, bool) and "action" not in kwargs:
        flag = flag or ("--no-" if default else "--") + name.replace("_", "-")
        kwargs["action"] = "store_false" if default else "store_true"
        show_default = False
    else:
        flag = flag or "--" + name.replace("_", "-")
        if "type" not in kwargs and "choices" not in kwargs and "action" not in kwargs and default is not None:
            kwargs["type"] = Path if isinstance(default, Path) else type(default)
    if show_default:
        help = f"{help} (default {_shown(default)})"
    (group or parser).add_argument(flag, dest=name, default=default, help=help, **kwargs)
    parser.set_defaults(**{CONFIG_FIELDS: (*(parser.get_default(CONFIG_FIELDS) or ()), name)})


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """``{field: parsed value}`` of every option the parser added with :func:`config_option`."""
    return {n: getattr(args, n) for n in getattr(args, CONFIG_FIELDS, ())}


def config_from_args(defaults: Any, args: argparse.Namespace, **overrides: Any) -> Any:
    """``defaults`` (a dataclass instance) with every config option the parser recorded replaced by its parsed
    value (fields the parser has no option for keep their default), then ``overrides``."""
    names = {f.name for f in dataclasses.fields(defaults)}
    values = {n: v for n, v in config_values(args).items() if n in names}
    return dataclasses.replace(defaults, **{**values, **overrides})


def signature_defaults(func: Any) -> dict[str, Any]:
    """A function's keyword defaults by name: the CLI reads a default from the function it calls when that function
    has no config dataclass (``fastcbm deal evaluate --batch-size`` from ``fastcbm.deal.evaluate.evaluate``)."""
    import inspect

    return {n: p.default for n, p in inspect.signature(func).parameters.items()
            if p.default is not inspect.Parameter.empty}


def folder_method(path: str | Path) -> str | None:
    """The method whose model folder ``path`` is (``"salf"`` | ``"cefam"`` | ``"deal"``), by its config.json's
    "format"; None for anything else (no folder, no config.json, another format, unreadable JSON)."""
    cfg = Path(path) / "config.json"
    try:
        meta = json.loads(cfg.read_text()) if cfg.is_file() else None
    except (OSError, ValueError):
        return None
    return FOLDER_FORMATS.get(meta.get("format")) if isinstance(meta, dict) else None


def refuse_other_method(path: str | Path | None, method: str, verb: str, flag: str = "--model") -> None:
    """One line when ``path`` is another method's model folder, naming the command that reads it (a SALF-CBM folder
    given to ``fastcbm cefam explain``: "use fastcbm salf explain")."""
    owner = folder_method(path) if path is not None else None
    if owner is not None and owner != method:
        raise InvalidArgument(f"{flag} {path} is a {METHOD_NAMES[owner]} model folder, not a {METHOD_NAMES[method]} "
                              f"one: use 'fastcbm {owner} {verb}'")


def positive(**values: int | float | None) -> None:
    """Refuse a value below 1 in one line naming its option (``positive(batch_size=0)`` → ``--batch-size``)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every parser of the tree under ``parser`` as ``(path, parser, subcommands)``: ``path`` the words after
    ``fastcbm`` (``("cefam", "train")``), ``subcommands`` the sub-parsers' action (None for a command that runs)."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    yield path, parser, sub
    if sub is not None:
        for name, child in sub.choices.items():
            yield from walk(child, (*path, name))
