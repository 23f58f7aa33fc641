from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import quotagate as qg

SRC = Path(qg.__file__).parent


def test_all_is_sorted_and_importable() -> None:
    assert qg.__all__ == sorted(qg.__all__)
    for name in qg.__all__:
        assert hasattr(qg, name), name


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        qg.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_version_is_a_string() -> None:
    assert isinstance(qg.__version__, str)
    assert qg.__version__.count(".") == 2


def test_error_tree() -> None:
    assert issubclass(qg.ConfigError, qg.QuotagateError)
    assert issubclass(qg.StorageError, qg.QuotagateError)


def _python(code: str) -> None:
    """Run ``code`` in a fresh interpreter (this one has imported redis-py long ago)."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_memory_only_use_never_imports_redis_py() -> None:
    # The storage means to import Redis lazily; quotagate/__init__.py used to import it eagerly.
    _python(
        textwrap.dedent(
            """
            import asyncio, sys
            import quotagate, quotagate.asgi, quotagate.fastapi

            async def main():
                async with quotagate.RateLimiter("memory://") as limiter:
                    assert (await limiter.hit("client", "10/minute")).allowed

            asyncio.run(main())
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("redis", "hiredis"))
            assert not loaded, loaded
            """
        )
    )


def test_redis_storage_is_still_importable_from_the_package() -> None:
    _python(
        "import quotagate\n"
        "from quotagate import RedisStorage\n"
        "from quotagate.storage.redis import RedisStorage as Declared\n"
        "assert RedisStorage is quotagate.RedisStorage is Declared\n"
    )


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a source file imports (at any depth, lazily or not)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_only_the_redis_storage_imports_redis_py_and_its_pipeline() -> None:
    importers: dict[str, set[str]] = {"redis": set(), "hiredis": set(), "pipeline": set()}
    for path in SRC.rglob("*.py"):
        name = path.relative_to(SRC).as_posix()
        for module in _imported_modules(path):
            top = module.split(".")[0]
            if top in ("redis", "hiredis"):
                importers[top].add(name)
            if module == "quotagate.storage.pipeline":
                importers["pipeline"].add(name)
    assert importers == {
        "redis": {"storage/redis.py", "storage/pipeline.py"},
        "hiredis": {"storage/redis.py", "storage/pipeline.py"},
        "pipeline": {"storage/redis.py"},
    }
