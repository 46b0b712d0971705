"""Layers point one way, and every name our tests and tools import from our packages exists.

    config → parallel → models / loss / data → runtime → checkpoint → planning / train / eval / launch → entry points

A lower layer never imports a higher one (also not inside a function). Entry points are the top-level
modules (`m2megatron/cli.py`, `encode.py`, `demo.py`, `tokenize.py`) and every package's `__main__.py`.
The GPU-only tests run only on a lent GPU, so a renamed function could hide in them for months: their
imports are checked here, on the CPU.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LAYER = {"config": 0, "compat": 0, "parallel": 1, "models": 2, "loss": 2, "data": 2, "runtime": 3, "checkpoint": 4,
         "planning": 5, "train": 5, "eval": 5, "launch": 5}


def _imports(path: Path):
    """(line, imported module) of every absolute import in the file, nested ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "m2megatron" and len(parts) > 1 else None


def test_every_package_is_placed_in_a_layer():
    packages = {p.name for p in (REPO / "m2megatron").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYER), f"add new packages to LAYER: {sorted(packages ^ set(LAYER))}"


def test_no_library_package_imports_a_higher_layer():
    upward = []
    for path in sorted((REPO / "m2megatron").rglob("*.py")):
        source = path.relative_to(REPO / "m2megatron").parts
        if len(source) == 1 or source[-1] == "__main__.py":
            continue  # entry points may import anything
        for line, module, _ in _imports(path):
            target = _package(module)
            if target in LAYER and LAYER[target] > LAYER[source[0]]:
                upward.append(f"m2megatron/{'/'.join(source)}:{line} ({source[0]}) imports {module} ({target})")
    assert upward == [], "\n".join(upward)


BOOTSTRAP = ("m2megatron/parallel/bootstrap.py", "_join_process_group")
"""The one function that starts a process group (through m2megatron.parallel.initialize)."""


def _calls_to(path: Path, name: str):
    """(line, innermost enclosing function) of every call of `name` (bare or as an attribute) in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in ast.walk(tree):
        callee = getattr(node, "func", None)
        if isinstance(node, ast.Call) and name in (getattr(callee, "attr", None), getattr(callee, "id", None)):
            inside = [f for f in functions if f.lineno <= node.lineno <= f.end_lineno]
            yield node.lineno, max(inside, key=lambda f: f.lineno).name if inside else "<module>"


def test_only_the_bootstrap_starts_a_process_group():
    """Every entry point, tool, benchmark and test pool comes up through m2megatron.parallel.initialize."""
    offenders = [f"{path.relative_to(REPO)}:{line} in {function}"
                 for folder in ("m2megatron", "tools", "tests", "kernels")
                 for path in sorted((REPO / folder).rglob("*.py"))
                 for line, function in _calls_to(path, "init_process_group")
                 if (str(path.relative_to(REPO)), function) != BOOTSTRAP]
    assert offenders == [], "call m2megatron.parallel.initialize instead:\n" + "\n".join(offenders)


BORROWED_FIXTURES: set[tuple[str, str]] = set()
"""Exceptions to the rule (none: the torchscale reference is tools/torchscale_reference.py, which tests import)."""


def test_tools_and_library_do_not_import_the_tests():
    offenders = [f"{path.relative_to(REPO)}:{line} imports {module}"
                 for folder in ("m2megatron", "tools", "kernels") for path in sorted((REPO / folder).rglob("*.py"))
                 for line, module, _ in _imports(path) if module.split(".")[0] == "tests"
                 and (str(path.relative_to(REPO)), module) not in BORROWED_FIXTURES]
    assert offenders == [], "\n".join(offenders)


@pytest.mark.parametrize("folder", ["tests/gpu", "tools"])
def test_every_name_imported_from_our_packages_exists(folder):
    missing = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, module, names in _imports(path):
            if module.split(".")[0] not in ("m2megatron", "m2megatron_kernels"):
                continue
            try:
                imported = importlib.import_module(module)
            except ImportError as exc:
                if "triton" in str(exc) or "transformer_engine" in str(exc) or "nvidia.dali" in str(exc):
                    continue  # a GPU-only dependency of a GPU-only module: importable where it runs
                missing.append(f"{path.relative_to(REPO)}:{line} cannot import {module} ({exc})")
                continue
            for name in names:
                if name != "*" and not hasattr(imported, name):
                    try:
                        importlib.import_module(f"{module}.{name}")
                    except ImportError:
                        missing.append(f"{path.relative_to(REPO)}:{line} {module} has no {name}")
    assert missing == [], "\n".join(missing)
