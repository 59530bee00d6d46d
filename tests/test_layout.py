"""The package's layers (ARCHITECTURE.md): no module imports from a later stage."""

from __future__ import annotations

import ast
import pathlib

import tclf

PACKAGE = pathlib.Path(tclf.__file__).parent
# Lower first. A module may import its own layer and those before it, never a later one.
LAYERS = [
    {"tclf", "tclf.storage", "tclf.faults", "tclf.demo"},
    {"tclf.data"},
    {"tclf.model", "tclf.musicnn"},
    {"tclf.evaluation"},
    {"tclf.training"},
    {"tclf.tune"},
    {"tclf.predict", "tclf.cli", "tclf.__main__"},
]


def _layer(module: str) -> int:
    """The layer of a dotted module name: its longest listed prefix."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        for index, layer in enumerate(LAYERS):
            if ".".join(parts[:end]) in layer:
                return index
    raise AssertionError(f"{module} is in no layer")


def _imports(path: pathlib.Path) -> set[str]:
    """The tclf modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tclf"):
            found.update(f"{node.module}.{a.name}" if node.module == "tclf" else node.module
                         for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tclf"))
    return found


def test_no_module_imports_a_later_stage():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, upward


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        _layer(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
