"""The layer rule of the README's Architecture section: a module imports only from its own
layer or below, and no modules import each other in a cycle when imported.

Read from the source (ast), so a lazy import inside a function counts as an import too; only
``if TYPE_CHECKING:`` blocks (annotations, never run) are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "quotagate"

#: Bottom to top, as the README's Architecture section lists them.
LAYERS: list[tuple[str, ...]] = [
    ("_types", "errors", "rates", "decision", "keys", "testing"),
    ("algorithms",),
    ("storage",),
    ("identity", "metrics"),
    ("limiter", "overlimit"),
    ("http",),
    ("_asgi", "_routes"),
    ("asgi", "fastapi"),
    ("slowapi",),
    ("gateway",),
    ("tools",),
    ("cli", "__main__"),
]


def _layer(module: str) -> int:
    """The layer of ``quotagate.<top>...``."""
    top = module.split(".")[1] if "." in module else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and the README")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The quotagate modules ``path`` imports; ``top_level_only``: those run at import time
    (not inside functions)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    return _imports_of(path.read_text("utf-8"), module, package, top_level_only=top_level_only)


def _imports_of(source: str, module: str, package: str, *, top_level_only: bool) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("quotagate"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.startswith("quotagate"):
                found.add(target)
                # ``from . import x`` / ``from .pkg import mod``: the module named, if one.
                found.update(
                    f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}")
                )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    found.discard(module)
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (SRC / relative).with_suffix(".py").is_file() or (SRC / relative).is_dir()


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_imports_only_from_its_layer_or_below() -> None:
    problems = []
    for path in _modules():
        module = _module_name(path)
        if module == "quotagate":
            continue  # the curated public API gathers from every layer below it
        for imported in _imports(path, top_level_only=False):
            if imported != "quotagate" and _layer(imported) > _layer(module):
                problems.append(f"{module} imports {imported} (a higher layer)")
    assert problems == []


def test_no_import_cycles_at_import_time() -> None:
    graph = {_module_name(p): _imports(p, top_level_only=True) for p in _modules()}
    # A submodule import runs its package's __init__ first: that is not an edge of a cycle.
    state: dict[str, int] = {}
    cycles: list[str] = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph.get(module, ())):
            if imported not in graph or module.startswith(imported + "."):
                continue
            if state.get(imported) == 1:
                cycles.append(" -> ".join([*path[path.index(imported) :], imported]))
            elif imported not in state:
                walk(imported, [*path, imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert cycles == []


def test_the_rule_sees_violations() -> None:
    """The checker itself: a low layer importing a higher one, lazily or not, is seen; an
    import for annotations only is not."""
    source = """
from typing import TYPE_CHECKING
from .decision import Decision
if TYPE_CHECKING:
    from .gateway.app import Gateway
def later():
    from .limiter import RateLimiter
"""
    found = _imports_of(source, "quotagate.rates", "quotagate", top_level_only=False)
    assert found == {"quotagate.decision", "quotagate.limiter"}
    assert _layer("quotagate.limiter") > _layer("quotagate.rates")
    at_import = _imports_of(source, "quotagate.rates", "quotagate", top_level_only=True)
    assert at_import == {"quotagate.decision"}
