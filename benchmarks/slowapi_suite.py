"""slowapi's own test suite, run against ``quotagate.slowapi``: the proof that migrating is
replacing ``slowapi`` with ``quotagate.slowapi`` in the imports.

The test files come from a git repository of slowapi (``--repo``: a clone or a bare mirror;
default: a fresh clone of https://github.com/laurentS/slowapi), are written to a temporary
directory with ``slowapi`` renamed to ``quotagate.slowapi`` in their import lines and nothing
else changed, and run by pytest in a temporary venv holding the versions below and quotagate
installed from this checkout (slowapi itself and ``limits`` are not installed: the suite
imports neither but through ``slowapi``). Prints the counts and each failing test with the
first line of why.

    .venv/bin/python benchmarks/slowapi_suite.py --repo PATH [--venv DIR] [--min-pass 90]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
UPSTREAM = "https://github.com/laurentS/slowapi"
#: What the suite needs, at versions quotagate supports and the suite passes on: a FastAPI
#: whose Starlette still has ``app.route`` (the suite uses it; Starlette 1.0 removed it).
REQUIREMENTS = ("fastapi==0.115.12", "httpx==0.28.1", "pytest==9.2.0", "mock==5.2.0", "hiro==1.1.1")

_IMPORT = re.compile(r"^(\s*)(from|import)\s+slowapi\b", re.MULTILINE)


def renamed(source: str) -> str:
    """``from slowapi... import`` / ``import slowapi`` lines with ``quotagate.slowapi``."""
    return _IMPORT.sub(r"\1\2 quotagate.slowapi", source)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def write_tests(repo: Path, ref: str, into: Path) -> list[str]:
    """The suite's files at ``ref`` under ``into``, imports renamed; their paths."""
    paths = [p for p in _git(repo, "ls-tree", "-r", "--name-only", ref, "tests").split() if p]
    for path in paths:
        target = into / path
        target.parent.mkdir(parents=True, exist_ok=True)
        source = _git(repo, "show", f"{ref}:{path}")
        target.write_text(renamed(source) if path.endswith(".py") else source, "utf-8")
    return paths


def make_venv(where: Path) -> Path:
    """A venv with the suite's requirements and quotagate from this checkout (made, or
    reused when ``where`` holds one: then only quotagate is installed afresh); its python."""
    python = where / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if python.exists():
        subprocess.run([*pip, "--no-deps", "--force-reinstall", str(CHECKOUT)], check=True)
    else:
        venv.create(where, with_pip=True)
        subprocess.run([*pip, *REQUIREMENTS, str(CHECKOUT)], check=True)
    return python


def run_suite(python: Path, root: Path) -> list[tuple[str, str | None]]:
    """Run pytest in ``root``: each test's id and None, or the first line of its failure."""
    report = root / "report.xml"
    subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
        cwd=root,
        check=False,
    )
    results: list[tuple[str, str | None]] = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = next((c for c in case if c.tag in ("failure", "error")), None)
        why = None if problem is None else (problem.get("message") or "").splitlines()[0:1]
        results.append((name, None if why is None else (why[0] if why else problem.tag)))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="a slowapi clone or mirror (default: clone)")
    parser.add_argument("--ref", default="HEAD", help="the commit of the suite (default HEAD)")
    parser.add_argument("--venv", type=Path, help="a venv to make or reuse (default: temporary)")
    parser.add_argument("--min-pass", type=int, default=0, help="exit 1 below this many passes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slowapi-suite-") as temp:
        work = Path(temp)
        repo = args.repo
        if repo is None:
            repo = work / "slowapi"
            subprocess.run(["git", "clone", "--quiet", UPSTREAM, str(repo)], check=True)
        suite = work / "suite"
        files = write_tests(repo, args.ref, suite)
        print(f"slowapi suite at {_git(repo, 'rev-parse', args.ref).strip()}: {len(files)} files")
        results = run_suite(make_venv(args.venv or work / "venv"), suite)
    failed = [(name, why) for name, why in results if why is not None]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed (of {len(results)})")
    for name, why in failed:
        print(f"  FAILED {name}: {why}")
    return 1 if len(results) - len(failed) < args.min_pass else 0


if __name__ == "__main__":
    sys.exit(main())
