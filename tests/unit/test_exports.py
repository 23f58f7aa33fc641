"""Every module's ``__all__`` lists what other modules take from it: the package's own code,
the tests, the benchmarks and the examples. A name imported from a module that does not
export it is a private detail leaking, or an export someone forgot."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "quotagate"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (SRC / relative).with_suffix(".py").is_file() or (
        SRC / relative / "__init__.py"
    ).is_file()


def _imported_names(path: Path) -> list[tuple[str, str, int]]:
    """``(module, name, line)`` for each ``from quotagate... import name`` in ``path``."""
    in_package = SRC in path.parents
    module = _module_name(path) if in_package else ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            if not in_package:
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join([*base, *([node.module] if node.module else [])])
        else:
            target = node.module or ""
        if target != "quotagate" and not target.startswith("quotagate."):
            continue
        for alias in node.names:
            if not _is_module(f"{target}.{alias.name}"):
                found.append((target, alias.name, node.lineno))
    return found


def test_what_is_imported_from_a_module_is_in_its_all() -> None:
    files = [
        *SRC.rglob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
        *(ROOT / "benchmarks").rglob("*.py"),
        *(ROOT / "examples").rglob("*.py"),
    ]
    missing = []
    for path in sorted(files):
        for module, name, line in _imported_names(path):
            exported = getattr(importlib.import_module(module), "__all__", None)
            if exported is None or name not in exported:
                where = path.relative_to(ROOT)
                missing.append(f"{where}:{line}: {name} is not in {module}.__all__")
    assert missing == []


def test_every_module_declares_all() -> None:
    without = [
        _module_name(path)
        for path in sorted(SRC.rglob("*.py"))
        if "__all__" not in path.read_text("utf-8") and path.name != "__main__.py"
    ]
    assert without == []
