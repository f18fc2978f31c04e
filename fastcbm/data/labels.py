"""Matching a labels CSV to the images of a cache, refusing every ambiguity instead of guessing.

A row ``path,class`` labels the image at that path: relative to the CSV's folder, or absolute. A row that is a *bare
file name* (no folder part; the extension may be left out) may also match an image elsewhere with that name — only
when exactly one image has it. Everything else is refused with one line naming the rows: a bare name shared by several images (ambiguous), two
rows giving one image different classes (conflict), rows that match no image (a stale CSV, or one written for another
folder), and images without a label. A row given twice with the same class is fine (counted in the report).

:func:`match_csv_labels` returns the labels, the class names and a report of how the rows were matched (what
``fastcbm train`` writes to ``train_report.json`` under ``"labels"``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch

from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile

HEADER_FIRST_CELLS = ("file", "path", "image", "filename", "name")
_DETAIL_ROWS = 200  # the report lists every row's match up to this many rows (counts always)


class LabelRows(tuple):
    """``(labels long [N], class names)`` — unpacks like the plain tuple it is — with ``.report`` (how the labels
    were found)."""

    report: dict[str, Any]

    def __new__(cls, labels: torch.Tensor, names: list[str], report: dict[str, Any]) -> Self:
        obj = super().__new__(cls, (labels, names))
        obj.report = report
        return obj


@dataclass
class _Row:
    line: int  # 1-based line in the CSV
    path: str
    cls: str
    how: str = ""  # "path" | "path (symlinks resolved)" | "name"
    files: list[int] = field(default_factory=list)


def _norm(p: str | os.PathLike) -> str:
    return os.path.normpath(os.path.abspath(p))


def _read_rows(path: Path) -> list[_Row]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidFile(f"labels: {path} is not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise InvalidFile(f"labels: {path} is empty")
    first = next(line for line in lines if line.strip())
    reader = csv.reader(lines, dialect="excel-tab" if "\t" in first else "excel")
    rows: list[_Row] = []
    column = 1
    header_seen = False
    for line_no, row in enumerate(reader, 1):
        if not row or not any(c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if not header_seen:
            header_seen = True
            if row[0].strip().lower() in HEADER_FIRST_CELLS:
                header = [h.strip().lower() for h in row]
                column = header.index("class") if "class" in header else 1
                continue
        if len(row) <= column or not row[0].strip() or not row[column].strip():
            raise InvalidFile(f"labels: {path} line {line_no}: expected 'path,class', got {row!r}")
        rows.append(_Row(line_no, row[0].strip(), row[column].strip()))
    return rows


def _examples(items: Sequence[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def match_csv_labels(path: str | os.PathLike, files: Sequence[str], class_names: Sequence[str] | None = None
                     ) -> LabelRows:
    """Labels for ``files`` from a CSV/TSV of ``path,class`` rows (an optional header whose first cell is
    file/path/image/filename may name a ``class`` column; ``#`` lines are comments) → :class:`LabelRows`.

    Without ``class_names`` the classes are numbered in order of first appearance over ``files``; with them (e.g. the
    training split's, for a validation CSV) a class that is not listed raises ``ValueError``. See the module
    docstring for what is matched and what is refused."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"labels: {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    rows = _read_rows(path)
    base = path.parent
    by_path: dict[str, list[int]] = {}
    by_name: dict[str, list[int]] = {}
    by_stem: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        by_path.setdefault(_norm(f), []).append(i)
        by_name.setdefault(Path(f).name, []).append(i)
        by_stem.setdefault(Path(f).stem, []).append(i)
    by_real: dict[str, list[int]] | None = None

    ambiguous, unmatched = [], []
    for r in rows:
        p = Path(r.path)
        full = _norm(p if p.is_absolute() else base / p)
        if full in by_path:
            r.how, r.files = "path", by_path[full]
            continue
        if by_real is None:  # symlinked data folders: compare resolved paths before giving up
            by_real = {}
            for i, f in enumerate(files):
                by_real.setdefault(os.path.realpath(f), []).append(i)
        real = os.path.realpath(full)
        if real in by_real:
            r.how, r.files = "path (symlinks resolved)", by_real[real]
        elif p.name == r.path and (r.path in by_name or (not p.suffix and r.path in by_stem)):
            # a bare file name (or a name without its extension, as the DEAL authors' lists): only when it is unique
            cands = by_name.get(r.path) or by_stem[r.path]
            if len(cands) == 1:
                r.how, r.files = "name", cands
            else:
                ambiguous.append(f"line {r.line} {r.path!r} matches {len(cands)} images ({files[cands[0]]}, "
                                 f"{files[cands[1]]}{', ...' if len(cands) > 2 else ''})")
        else:
            unmatched.append(r)

    # one class per image
    label_of: dict[int, _Row] = {}
    conflicts, duplicates = [], 0
    for r in rows:
        for i in r.files:
            prev = label_of.get(i)
            if prev is None:
                label_of[i] = r
            elif prev.cls != r.cls:
                conflicts.append(f"{files[i]}: line {prev.line} says {prev.cls!r}, line {r.line} says {r.cls!r}")
            else:
                duplicates += 1
    if conflicts:
        raise InvalidFile(f"labels: {path} gives {len(conflicts)} image(s) two classes: {_examples(conflicts)}")
    if ambiguous:
        raise InvalidFile(f"labels: {path}: {len(ambiguous)} bare file name(s) match several images, so the label "
                          f"would be a guess: {_examples(ambiguous)}; write those rows as paths relative to the CSV's "
                          "folder or absolute")
    unmatched_txt = ""
    if unmatched:
        roots = {str(Path(_norm(Path(r.path) if Path(r.path).is_absolute() else base / r.path)).parent)
                 for r in unmatched}
        try:
            root = os.path.commonpath(sorted(roots))
        except ValueError:
            root = min(roots)
        unmatched_txt = (f"{len(unmatched)} of its {len(rows)} rows match no image of the cache (e.g. "
                         f"{_examples([f'line {r.line} {r.path!r}' for r in unmatched], 2)}; resolved under {root}, "
                         "which holds none of the cached images: was the CSV written for another folder?)")
    missing = [f for i, f in enumerate(files) if i not in label_of]
    if missing:
        raise InvalidFile(f"labels: {path} has no label for {missing[0]} ({len(missing)} of {len(files)} images "
                          "unlabelled)" + (f"; {unmatched_txt}" if unmatched_txt else ""))
    if unmatched:
        raise InvalidFile(f"labels: {path}: {unmatched_txt}; remove those rows or fix their paths")

    names: list[str] = [] if class_names is None else list(class_names)
    index = {c: i for i, c in enumerate(names)}
    labels = []
    for i, f in enumerate(files):
        cls = label_of[i].cls
        if cls not in index:
            if class_names is not None:
                raise InvalidFile(f"labels: {path} line {label_of[i].line} gives {f} the class {cls!r}, which is not "
                                  f"among the classes ({names[:5]}{'...' if len(names) > 5 else ''})")
            index[cls] = len(names)
            names.append(cls)
        labels.append(index[cls])

    counts: dict[str, int] = {}
    for r in rows:
        counts[r.how] = counts.get(r.how, 0) + 1
    report: dict[str, Any] = {"source": "csv", "file": str(path), "rows": len(rows), "images": len(files),
                              "matched_by": counts, "duplicate_rows_same_class": duplicates}
    if len(rows) <= _DETAIL_ROWS:
        report["row_matches"] = [{"line": r.line, "path": r.path, "how": r.how, "image": files[r.files[0]]}
                                 for r in rows]
    else:
        report["name_matched_examples"] = [{"line": r.line, "path": r.path, "image": files[r.files[0]]}
                                           for r in rows if r.how == "name"][:20]
    return LabelRows(torch.tensor(labels, dtype=torch.long), names, report)


def folder_report(files: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
    """The ``"labels"`` report for ImageFolder labels (each image's parent folder is its class)."""
    return {"source": "folders", "images": len(files), "classes": len(names),
            "how": "the parent folder name of every image"}


def folder_labels(files: Sequence[str], class_names: Sequence[str] | None = None
                  ) -> tuple[torch.Tensor, list[str]]:
    """ImageFolder labels: the parent directory name of every file → (labels long [N], class names).

    Without ``class_names`` the classes are the sorted distinct directory names (torchvision's ImageFolder order);
    with them, a file whose directory is not a listed class raises ``ValueError`` naming it."""
    dirs = [Path(f).parent.name for f in files]
    names = sorted(set(dirs)) if class_names is None else list(class_names)
    index = {c: i for i, c in enumerate(names)}
    missing = [f for f, d in zip(files, dirs) if d not in index]
    if missing:
        raise InvalidArgument(f"labels: {len(missing)} images are in folders that are not classes, e.g. {missing[0]} "
                              f"(classes: {names[:5]}{'...' if len(names) > 5 else ''})")
    return LabelRows(torch.tensor([index[d] for d in dirs], dtype=torch.long), names, folder_report(files, names))


def csv_labels(path: str | os.PathLike, files: Sequence[str], class_names: Sequence[str] | None = None
               ) -> tuple[torch.Tensor, list[str]]:
    """Labels from a CSV/TSV file of ``path,class`` rows → (labels long [N] for ``files``, class names), with
    ``.report`` saying how every row was matched. Paths are relative to the CSV's folder or absolute; a bare file name
    matches an image elsewhere only when exactly one image has that name. Conflicting rows, ambiguous names, rows that
    match no image and unlabelled images are refused, naming the rows (:func:`fastcbm.data.labels.match_csv_labels`).
    An optional header row (first cell ``file``/``path``/``image``/``filename``) may name a ``class`` column to use
    instead of the second (the testbed's ``labels.csv`` is ``file,label,class``).

    Without ``class_names`` the classes are numbered in order of first appearance; with them (e.g. the training
    split's, for a validation CSV), a class that is not listed raises ``ValueError`` naming it."""
    return match_csv_labels(path, files, class_names)
