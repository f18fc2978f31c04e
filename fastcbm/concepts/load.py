"""Concept lists from files: a text file (one concept per line) or JSON ``{class: [concepts]}`` (the format
label-free CBM, SALF-CBM and DEAL share), into an ordered, case-insensitively unique :class:`ConceptSet`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fastcbm.errors import InvalidFile

log = logging.getLogger("fastcbm.concepts")


@dataclass
class ConceptSet:
    """An ordered, de-duplicated concept list.

    ``names``: the concepts, in first-seen order. ``class_to_concepts``: for JSON sources and generators, each class's
    own concepts (spelled as in ``names``), else None. ``source``: where it came from (a path or a generator name).
    """

    names: list[str]
    class_to_concepts: dict[str, list[str]] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def subset(self, keep: Iterable[str]) -> "ConceptSet":
        """The concepts in ``keep`` (order of this set), with the class mapping restricted to them."""
        keep_set = set(keep)
        mapping = None
        if self.class_to_concepts is not None:
            mapping = {c: [x for x in v if x in keep_set] for c, v in self.class_to_concepts.items()}
        return ConceptSet([x for x in self.names if x in keep_set], mapping, self.source)

    def save(self, path: str | Path) -> None:
        """Write as JSON ``{class: [concepts]}`` when there is a class mapping and the path ends in .json, else as
        text, one concept per line (both readable by :func:`load_concepts`)."""
        path = Path(path)
        if path.suffix.lower() == ".json" and self.class_to_concepts is not None:
            path.write_text(json.dumps(self.class_to_concepts, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            path.write_text("".join(n + "\n" for n in self.names), encoding="utf-8")


def _dedup(items: Iterable[str], canon: dict[str, str]) -> tuple[list[str], int]:
    """Keep the first spelling of each case-insensitive name; ``canon`` (lower → first spelling) is shared."""
    out, dropped = [], 0
    for item in items:
        key = item.casefold()
        if key in canon:
            dropped += 1
            continue
        canon[key] = item
        out.append(item)
    return out, dropped


def _concepts_from_mapping(data: dict, where: str) -> ConceptSet:
    canon: dict[str, str] = {}
    names: list[str] = []
    mapping: dict[str, list[str]] = {}
    lists = _class_lists(data, where)
    dropped = sum(1 for v in data.values() for c in v if c.strip())  # validated: lists of strings
    for cls, own in lists.items():
        new, _ = _dedup(own, canon)
        names += new
        mapping[cls] = [canon[c.casefold()] for c in own]
    dropped -= len(names)
    if dropped:
        log.info("%s: dropped %d duplicate concept(s) (case-insensitive)", where, dropped)
    return ConceptSet(names, mapping, where)


def concepts_from_mapping(data: dict[str, list[str]], source: str = "<mapping>") -> ConceptSet:
    """A :class:`ConceptSet` from ``{class: [concepts]}``: the union in first-seen order, case-insensitively unique."""
    if not isinstance(data, dict):
        raise InvalidFile(f"{source}: expected a mapping {{class: [concepts]}}, got {type(data).__name__}")
    out = _concepts_from_mapping(data, source)
    if not out.names:
        raise InvalidFile(f"{source}: no concepts (every list is empty after stripping blanks)")
    return out


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InvalidFile(f"concept list {path} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark from Windows editors
    except UnicodeDecodeError as exc:
        raise InvalidFile(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise InvalidFile(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def load_concept_mapping(path: str | Path) -> dict[str, list[str]]:
    """``{class: [concepts]}`` from a JSON file, each class's list stripped of blanks and of case-insensitive repeats
    (first spelling kept), in file order. Raises :class:`~fastcbm.errors.InvalidFile` naming the file for a missing
    file, bad JSON, anything but an object of lists of strings (a non-string entry is refused, never dropped), or no
    class at all. A class may have an empty list: the caller decides whether that is allowed."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        got = "an empty object" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise InvalidFile(f"{path}: expected a JSON object {{class: [concepts]}} (e.g. {{\"blue circle\": "
                          f"[\"circle\", \"border\"]}}), got {got}")
    return _class_lists(data, str(path))


def _class_lists(data: dict, where: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for cls, concepts in data.items():
        if isinstance(concepts, str) or not isinstance(concepts, list):
            raise InvalidFile(f"{where}: class {cls!r} must map to a list of strings, got {type(concepts).__name__}")
        own: list[str] = []
        seen: set[str] = set()
        for i, c in enumerate(concepts):
            if not isinstance(c, str):
                raise InvalidFile(f"{where}: class {cls!r}, entry {i} is {type(c).__name__} ({c!r}), not a string")
            c = c.strip()
            if c and c.casefold() not in seen:
                seen.add(c.casefold())
                own.append(c)
        out[str(cls)] = own
    return out


def load_concepts(path: str | Path) -> ConceptSet:
    """Load a concept list.

    ``*.json``: ``{class: [concepts]}`` (the union over classes, first-seen order; a plain JSON list of strings is
    also accepted). Anything else: UTF-8 text, one concept per line; lines are stripped, blank lines and lines
    starting with ``#`` skipped. Duplicates (case-insensitive) are dropped, keeping the first spelling, and counted in
    the log. Raises :class:`~fastcbm.errors.InvalidFile` naming the file for: a missing file, bad JSON (with line and
    column), non-string entries, or a list that is empty after cleaning.
    """
    path = Path(path)
    where = str(path)
    if path.suffix.lower() == ".json":
        data = _read_json(path)
        if isinstance(data, list):
            out = _concepts_from_mapping({"": data}, where)
            out.class_to_concepts = None
        elif isinstance(data, dict):
            out = _concepts_from_mapping(data, where)
        else:
            raise InvalidFile(f"{where}: expected a JSON object {{class: [concepts]}} or a list, got "
                              f"{type(data).__name__}")
    else:
        lines = [ln.strip() for ln in _read_text(path).splitlines()]
        names, dropped = _dedup([ln for ln in lines if ln and not ln.startswith("#")], {})
        if dropped:
            log.info("%s: dropped %d duplicate concept(s) (case-insensitive)", where, dropped)
        out = ConceptSet(names, None, where)
    if not out.names:
        raise InvalidFile(f"{where}: the concept list is empty (after removing blank lines, comments and duplicates)")
    return out
