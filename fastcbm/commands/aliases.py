"""The old spellings of the method verbs, kept working: ``fastcbm train|evaluate|explain [--method M] ...`` and
``fastcbm demo --method M ...`` are rewritten to ``fastcbm M <verb> ...`` before the arguments are parsed, with one
line on stderr naming the new spelling. Rewriting (instead of a second parser per old spelling) means an old spelling
gets exactly the new command's options: one a method does not use is refused, as with the new spelling.
"""

from __future__ import annotations

import os

from fastcbm.errors import InvalidArgument

VERBS = ("train", "evaluate", "explain", "demo")
METHODS = ("salf", "cefam", "deal")
DEFAULT_METHOD = "salf"  # the old train / evaluate / explain were SALF-CBM's unless --method said otherwise

# old spelling → new spelling, for the README and `fastcbm -h` (tests/test_cli.py runs every row)
ALIASES = (
    ("fastcbm train [--method salf] ...", "fastcbm salf train ..."),
    ("fastcbm evaluate [--method salf] ...", "fastcbm salf evaluate ..."),
    ("fastcbm explain [--method salf] ...", "fastcbm salf explain ..."),
    ("fastcbm explain --engine FILE IMAGE", "fastcbm salf explain --engine FILE IMAGE"),
    ("fastcbm explain --method cefam ...", "fastcbm cefam explain ..."),
    ("fastcbm demo --method salf ...", "fastcbm salf demo ... (or fastcbm demo ...)"),
    ("fastcbm demo --method cefam ...", "fastcbm cefam demo ..."),
    ("fastcbm demo --method deal ...", "fastcbm deal demo ..."),
)


def _is_method_flag(token: str) -> bool:
    # --method, --method=X, or an unambiguous prefix of it as argparse accepted (--me, --meth, ...)
    name = token.split("=", 1)[0]
    return len(name) >= 4 and "--method".startswith(name)


def rewrite(argv: list[str]) -> tuple[list[str], str | None]:
    """``(argv in the new spelling, the notice to print or None)``; ``argv`` itself is left alone."""
    i = next((j for j, t in enumerate(argv) if not t.startswith("-")), None)  # skips -v / -vv before the command
    if i is None or argv[i] not in VERBS:
        return list(argv), None
    verb, rest = argv[i], argv[i + 1:]
    stop = rest.index("--") if "--" in rest else len(rest)
    method, kept, j = None, [], 0
    while j < len(rest):
        token = rest[j]
        if j < stop and _is_method_flag(token):
            if "=" in token:
                method = token.split("=", 1)[1]
            elif j + 1 < len(rest):
                method, j = rest[j + 1], j + 1
            else:
                raise InvalidArgument(f"fastcbm {verb}: error: --method needs a value ({', '.join(METHODS)})")
        else:
            kept.append(token)
        j += 1
    if method is None and verb == "demo":
        return list(argv), None  # `fastcbm demo` is a command of its own (the README's main job)
    if method is not None and method not in METHODS:
        raise InvalidArgument(f"fastcbm {verb}: error: --method must be one of {', '.join(METHODS)}, got {method!r}")
    old = f"fastcbm {verb}" + (f" --method {method}" if method is not None else "")
    method = method or DEFAULT_METHOD
    notice = (f"fastcbm: '{old}' is now spelled 'fastcbm {method} {verb}' (the old spelling still works)"
              if int(os.environ.get("RANK", "0")) == 0 else None)  # under torchrun: once, from rank 0
    return [*argv[:i], method, verb, *kept], notice
