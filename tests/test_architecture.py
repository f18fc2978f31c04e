"""The shape of the package: no import circle among fastcbm's modules (lazy, in-function imports included), and the
shared infrastructure never imports a method package (methods register into it instead)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fastcbm.salf", "fastcbm.cefam", "fastcbm.deal")
SHARED = ("fastcbm.models", "fastcbm.cache", "fastcbm.data", "fastcbm.heads", "fastcbm.concepts", "fastcbm.files",
          "fastcbm.html", "fastcbm.errors", "fastcbm.prompts", "fastcbm.losses", "fastcbm.metrics", "fastcbm.cam")


def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((ROOT / "fastcbm", "fastcbm"), (ROOT / "kernels", "fastcbm.kernels")):
        for p in base.rglob("*.py"):
            parts = p.relative_to(base).with_suffix("").parts
            name = ".".join((prefix, *parts))
            mods[name.removesuffix(".__init__")] = p
    return mods


@functools.cache
def _import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [resolve(f"{node.module}.{a.name}") or resolve(node.module) for a in node.names]
            # a package re-exporting its own submodules is not a circle
            edges[m] |= {t for t in targets if t and t != m and not t.startswith(m + ".") and not m.startswith(t + ".")}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    cycles = _cycles(_import_graph())
    assert not cycles, "import circles (every import counted, lazy ones too): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_detector_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("shared", SHARED)
def test_shared_infrastructure_imports_no_method(shared):
    edges = _import_graph()
    bad = sorted((m, t) for m, ts in edges.items() if m == shared or m.startswith(shared + ".")
                 for t in ts if t.startswith(METHODS))
    assert not bad, f"{shared} imports method code: {bad}"
