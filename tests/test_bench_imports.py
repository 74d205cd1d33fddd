"""Every module the benches import, at the top or inside a function, exists: a bench fails
late (the suite's part 5 after 45 minutes) on an import of a module that has moved."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("path", sorted(BENCH.rglob("*.py")), ids=lambda p: str(p.relative_to(BENCH)))
def test_every_module_a_bench_imports_exists(path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the benches import each other by name
    optional = {"matplotlib", "matplotlib.pyplot"}  # plots are skipped without it
    missing = [m for m in sorted(imported_modules(path) - optional)
               if m.split(".")[0] not in sys.builtin_module_names and importlib.util.find_spec(m) is None]
    assert not missing, f"{path.name} imports modules that do not exist: {missing}"
