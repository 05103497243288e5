"""The package's layout rules, read from the source: no import cycles between its parts,
and Ray only in the runtime."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "localnet"


def _imports() -> dict[str, set[str]]:
    """module -> the localnet modules and outside packages it imports, lazy imports
    inside functions included (a cycle through a lazy import is still a cycle)."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        got = out.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                got.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                got.add(mod)
                got.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x`
    return out


def _part(mod: str) -> str | None:
    """The part of localnet a module belongs to: its subpackage, or itself."""
    bits = mod.split(".")
    if bits[0] != "localnet" or len(bits) < 2:
        return None
    return ".".join(bits[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                comps.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return comps


def test_the_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_the_parts_of_the_package():
    """engine, stage, ledger, channels, metrics, runtime, ...: each may use another only
    if that one does not use it back, so each can be read, tested and replaced alone."""
    imports = _imports()
    assert "localnet.runtime.worker" in imports and "localnet.engine" in imports
    edges: dict[str, set[str]] = {}
    for mod, targets in imports.items():
        a = _part(mod)
        for t in targets:
            b = _part(t)
            if a and b and a != b and (b in {_part(m) for m in imports}):
                edges.setdefault(a, set()).add(b)
    assert "localnet.stage" in edges["localnet.runtime"]  # the graph is really built
    assert _cycles(edges) == []


def test_only_the_runtime_imports_ray():
    imports = _imports()
    users = sorted(m for m, ts in imports.items()
                   if any(t == "ray" or t.startswith("ray.") for t in ts))
    assert users and all(m.startswith("localnet.runtime.") for m in users), users
