"""Config dataclasses as JSON (fastcbm.configs.JsonConfig): one implementation for every saved config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from fastcbm.configs import JsonConfig
from fastcbm.errors import InvalidFile


@dataclass
class Inner(JsonConfig):
    betas: tuple[float, float] = (0.9, 0.98)


@dataclass
class Outer(JsonConfig):
    name: str = "x"
    grid: tuple[int, int] = (7, 7)
    names: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


@dataclass
class Lenient(JsonConfig):
    json_unknown = "ignore"
    a: int = 1


def test_round_trip_through_json_text_keeps_tuples_and_nested_configs():
    c = Outer(name="y", grid=(3, 5), names=["a"], inner=Inner((0.5, 0.6)))
    d = json.loads(json.dumps(c.to_json()))
    assert d == {"name": "y", "grid": [3, 5], "names": ["a"], "inner": {"betas": [0.5, 0.6]}}
    assert Outer.from_json(d) == c


def test_unknown_keys_are_refused_or_ignored_as_the_class_says():
    with pytest.raises(InvalidFile, match=r"Outer: unknown fields \['zzz'\]"):
        Outer.from_json({"zzz": 1})
    assert Lenient.from_json({"a": 2, "zzz": 1}) == Lenient(2)
    with pytest.raises(InvalidFile, match="expected a JSON object, got list"):
        Outer.from_json([1])


@pytest.mark.parametrize("cls", ["fastcbm.salf.model:SALFConfig", "fastcbm.cefam.model:CEFAMConfig",
                                 "fastcbm.deal.train:DealConfig"])
def test_saved_configs_use_it(cls):
    import importlib

    module, _, name = cls.partition(":")
    config = getattr(importlib.import_module(module), name)
    assert issubclass(config, JsonConfig)
    assert config.from_json(json.loads(json.dumps(config().to_json()))) == config()
