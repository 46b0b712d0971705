"""The modules of m2megatron/eval import one another one way (issue 26): no import circle, nested
(function-level) imports included. The package's lazy `__init__` re-exports are not edges."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

EVAL = Path(__file__).resolve().parents[2] / "m2megatron" / "eval"


def _import_graph() -> dict[str, set[str]]:
    modules = {f"m2megatron.eval.{p.stem}": p for p in EVAL.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def _a_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (depth-first search), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_eval_modules_import_each_other_one_way():
    graph = _import_graph()
    assert "m2megatron.eval.sets" in graph["m2megatron.eval.retrieval"]  # the graph sees nested imports too
    circle = _a_circle(graph)
    assert circle is None, " → ".join(circle)


def test_the_circle_finder_finds_a_circle():
    assert _a_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
