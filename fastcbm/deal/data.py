"""DEAL's inputs: concepts in the authors' ``{class: [descriptors]}`` JSON format, concept-augmented captions, and
descriptors for the synthetic testbed's 12 classes."""

from __future__ import annotations

import os
from pathlib import Path

from fastcbm.concepts.load import load_concept_mapping
from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile

CAPTION_FORMS = ("code", "paper")


def load_concepts_json(path: str | os.PathLike, k: int = 5) -> dict[str, list[str]]:
    """``{class: [first k descriptors]}`` from the authors' JSON format (``{class: [descriptors]}``, usually 6 per
    class of which the released code uses the first 5), read by :func:`fastcbm.concepts.load_concept_mapping`.

    Raises :class:`~fastcbm.errors.UserError` (one line naming the file and the class) for a missing or malformed
    file, a non-string descriptor, a class without descriptors, or a class with fewer than ``k``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"concepts: {path} does not exist (expected a JSON file {{class: [descriptors]}})")
    return select_concepts(load_concept_mapping(path), k, source=str(path))


def select_concepts(raw: dict, k: int = 5, *, source: str = "concepts") -> dict[str, list[str]]:
    """Validate ``{class: [descriptors]}`` and keep the first ``k`` descriptors of each class."""
    if k < 1:
        raise InvalidArgument(f"k must be >= 1 (descriptors per class), got {k}")
    out: dict[str, list[str]] = {}
    for name, descs in raw.items():
        if isinstance(descs, str) or not isinstance(descs, (list, tuple)):
            raise InvalidFile(f"{source}: class {name!r} must map to a list of descriptor strings, got "
                              f"{type(descs).__name__}")
        bad = [d for d in descs if not isinstance(d, str)]
        if bad:
            raise InvalidFile(f"{source}: class {name!r} has a descriptor that is not a string ({bad[0]!r}); "
                              "descriptors are text")
        descs = [d.strip() for d in descs if d.strip()]
        if not descs:
            raise InvalidFile(f"{source}: class {name!r} has no descriptors")
        if len(descs) < k:
            raise InvalidFile(f"{source}: class {name!r} has {len(descs)} descriptors, fewer than k={k}")
        out[str(name)] = descs[:k]
    return out


def captions(class_name: str, descriptors: list[str], form: str = "code") -> str:
    """The concept-augmented caption of a class: ``form="code"`` (the released code)
    "{class}. It may contain c1, …, cK"; ``form="paper"`` "An image of {class} with c1, …, and cK"."""
    if form not in CAPTION_FORMS:
        raise InvalidArgument(f"caption form must be one of {CAPTION_FORMS}, got {form!r}")
    if not descriptors:
        raise InvalidArgument(f"class {class_name!r} has no descriptors")
    if form == "code":
        return f"{class_name}. It may contain {', '.join(descriptors)}"
    listed = descriptors[0] if len(descriptors) == 1 else ", ".join(descriptors[:-1]) + ", and " + descriptors[-1]
    return f"An image of {class_name} with {listed}"


def testbed_concepts(distinct: bool = False) -> dict[str, list[str]]:
    """Descriptors for each of the synthetic testbed's 12 classes ("blue circle", ...), from its generator; every word
    is in the testbed tokenizer's vocabulary and every descriptor has a ground-truth concept mask where present.

    ``distinct=False``: six per class, the class object's shape and colour, its optional parts (border, dot) and the two
    patterned textures (the authors' format holds six, of which DEAL uses the first five). Shape, colour and texture
    name the *same* pixels (the class object), so DEAL's separation term pushes apart maps whose true regions coincide.
    ``distinct=True``: three per class that occupy different pixels — the object's shape, its border, its dot — as
    DEAL's concepts are meant to be (the authors ask their LLM for "discriminative visual features with minimum
    overlap"); the DEAL demo uses these (``k=3``; the testbed has no more non-overlapping descriptors per class).
    """
    from fastcbm.data import synthetic as S

    if distinct:
        return {f"{color} {shape}": [shape, "border", "dot"] for shape, color in S.class_concepts()}
    return {f"{color} {shape}": [shape, color, "border", "dot", "striped", "checkered"]
            for shape, color in S.class_concepts()}


def match_classes(class_names: list[str], concepts: dict[str, list[str]]) -> dict[str, list[str]]:
    """``{folder class: descriptors}``: a folder name matches a key as is or with ``_`` read as a space (ImageFolder
    exports write "blue_circle" for "blue circle"). ValueError naming the first class without descriptors."""
    out = {}
    for name in class_names:
        for key in (name, name.replace("_", " ")):
            if key in concepts:
                out[name] = concepts[key]
                break
        else:
            raise InvalidFile(f"concepts: class {name!r} has no descriptors (the JSON has e.g. "
                              f"{sorted(concepts)[:3]})")
    return out


def class_display_name(name: str, concepts: dict[str, list[str]]) -> str:
    """The class name used in captions: the JSON key the folder matched ("blue_circle" → "blue circle")."""
    return name if name in concepts else name.replace("_", " ")
