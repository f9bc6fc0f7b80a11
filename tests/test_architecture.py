"""The package's shape, as docs/architecture.md states it: imports point one way, only the
dist layer talks MPI, one definition of each shared format, small units."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fedmpi"
# A package may import only packages listed before it (docs/architecture.md).
ORDER = [
    "errors",
    "runtime",
    "config",
    "store",
    "data",
    "model",
    "dist",
    "fl",
    "eval",
    "train",
    "analysis",
    "cli",
]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        yield path, rel, ast.parse(path.read_text())


def package_of(rel: Path) -> str:
    """The layer of a module; the top-level `python -m fedmpi.X` shims and every
    `__main__.py` are command lines."""
    if rel.name == "__main__.py" or (len(rel.parts) == 1 and rel.stem not in ORDER):
        return "cli" if rel.stem != "__init__" else "root"
    return rel.parts[0].removesuffix(".py")


def imported(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
    return out


def test_imports_point_one_way():
    wrong = defaultdict(list)
    for _, rel, tree in modules():
        pkg = package_of(rel)
        if pkg == "root":
            continue
        for name in imported(tree):
            parts = name.split(".")
            if parts[0] != "fedmpi" or len(parts) < 2 or parts[1] == pkg:
                continue
            if ORDER.index(parts[1]) > ORDER.index(pkg):
                wrong[f"{pkg} -> {parts[1]}"].append(str(rel))
    assert not wrong, dict(wrong)


def test_only_the_dist_layer_talks_mpi():
    talkers = [
        str(rel)
        for _, rel, tree in modules()
        if any(
            n.split(".")[0] == "mpi4py" or n.startswith("torch.distributed") for n in imported(tree)
        )
    ]
    assert talkers and all(t.startswith("dist/") for t in talkers), talkers


@pytest.mark.parametrize("name", ["read_csv", "write_csv", "append_csv", "format_table"])
def test_one_definition_of_each_format(name):
    found = [
        str(path.relative_to(ROOT))
        for path in [*PKG.rglob("*.py"), *(ROOT / "bench").glob("*.py")]
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == name
    ]
    assert found == ["fedmpi/store/tables.py"], found


def test_exit_codes_defined_once():
    found = defaultdict(list)
    for path in [*PKG.rglob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id.startswith("EXIT_"):
                        found[t.id].append(str(path.relative_to(ROOT)))
    assert found and all(v == ["fedmpi/errors.py"] for v in found.values()), dict(found)


def test_units_are_small():
    big, long_functions = [], []
    for path, rel, tree in modules():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            big.append(f"{rel}: {lines}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.name}: {n}")
    assert not big and not long_functions, (big, long_functions)


def test_every_package_says_what_it_owns():
    for init in sorted(PKG.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, init
