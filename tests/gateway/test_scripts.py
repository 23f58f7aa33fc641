"""``scripts/serve``, the README's first command: it installs the package once, and a start with
nothing changed goes straight to ``quotagate serve`` (no pip run, no ten seconds)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "serve"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": os.environ.get("PYTHON", "python3")},
        check=False,
    )


def test_a_second_start_with_nothing_changed_does_not_install_again() -> None:
    first = serve("--help")  # installs if this checkout's .venv has not had it yet
    assert first.returncode == 0, first.stderr
    second = serve("--help")
    assert second.returncode == 0, second.stderr
    assert "installing" not in second.stderr
    assert "--config" in second.stdout  # it ran `quotagate serve --help`
    stamp = (ROOT / ".venv" / ".quotagate-installed").read_text().split()[0]
    assert len(stamp) == 64  # pyproject.toml's SHA-256: a change to it installs again
