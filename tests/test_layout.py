"""The package's shape: imports point down a fixed order of layers with no cycle (function-level
imports included), every module is small and says what it does, and `--help` imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightopd"
MAX_LINES = 350

# Each unit (a module or subpackage) may import its own modules and units of lower layers only.
LAYERS = [
    ("lightopd", "lightopd.errors", "lightopd.progress", "lightopd.memory", "lightopd.panels"),
    ("lightopd.options", "lightopd.hub", "lightopd.stopping"),
    ("lightopd.objectives", "lightopd.data", "lightopd.report"),
    ("lightopd.tiny",),
    ("lightopd.tasks",),
    ("lightopd.specs",),
    ("lightopd.config",),
    ("lightopd.demo_config", "lightopd.rounds_config", "lightopd.merge_config"),
    ("lightopd.layering", "lightopd.engine"),
    ("lightopd.provenance",),
    ("lightopd.training",),
    ("lightopd.stages",),
    ("lightopd.cli",),
    ("lightopd.__main__",),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every lightopd module `name` imports, at any depth of its code (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative import (the package uses absolute imports)"
            base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES)
    return found - {name}


def unit_of(name: str) -> str:
    while name not in RANK:
        name = name.rpartition(".")[0]
    return name


def test_every_module_is_in_a_layer():
    assert all(unit_of(name) for name in MODULES)


def test_imports_point_down():
    wrong = []
    for name in MODULES:
        for target in imports_of(name):
            here, there = unit_of(name), unit_of(target)
            if here != there and RANK[there] >= RANK[here]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports of a unit at the same or a higher layer:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [])


def test_the_cycle_detector_finds_a_cycle(monkeypatch):
    """The check above can fail: a cycle planted in the graph is reported."""
    real = imports_of

    def planted(name: str) -> set[str]:
        return real(name) | ({"lightopd.cli"} if name == "lightopd.errors" else set())

    monkeypatch.setitem(globals(), "imports_of", planted)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_small_and_documented(name):
    path = MODULES[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path} has {len(text.splitlines())} lines"
    if path.name != "__main__.py" or text.strip():
        assert ast.get_docstring(ast.parse(text)), f"{path} has no docstring saying what it does"


def test_help_imports_no_torch():
    code = ("import runpy, sys\n"
            "for argv in (['--help'], ['train', '--help'], ['eval', '--help']):\n"
            "    sys.argv = ['lightopd', *argv]\n"
            "    try:\n"
            "        runpy.run_module('lightopd', run_name='__main__')\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"
