"""Config dataclasses as JSON, once: :class:`JsonConfig` gives a dataclass ``to_json()`` (tuples become lists, nested
configs become objects) and ``from_json(d)`` (lists become tuples again where the field's default is a tuple, nested
configs are rebuilt, unknown keys are refused in one line — or ignored where the class says so)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

from fastcbm.errors import InvalidFile


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


class JsonConfig:
    """Mixin for config dataclasses. ``json_unknown``: ``"refuse"`` (default: a key this version does not know means
    a file written by a newer fastcbm, or edited) or ``"ignore"``."""

    json_unknown: ClassVar[str] = "refuse"

    def to_json(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_json(cls, d: Any) -> Self:
        if not isinstance(d, dict):
            raise InvalidFile(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(fields))
        if unknown and cls.json_unknown == "refuse":
            raise InvalidFile(f"{cls.__name__}: unknown fields {unknown} (saved by a newer fastcbm, or edited?)")
        kw = {}
        for name, value in d.items():
            if name not in fields:
                continue
            default = _default(fields[name])
            if isinstance(default, JsonConfig) and isinstance(value, dict):
                value = type(default).from_json(value)
            elif isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            kw[name] = value
        try:
            return cls(**kw)  # type: ignore[call-arg]
        except TypeError as exc:  # a required field missing
            raise InvalidFile(f"{cls.__name__}: {exc}") from None
