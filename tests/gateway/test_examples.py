"""``examples/gateway.toml`` and ``examples/fleet.toml``: the README's examples, valid configs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from quotagate.gateway.config import config_digest, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gateway.toml"


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quotagate", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def readme_toml_block(after: str) -> tuple[str, str]:
    """The README's first TOML block after the text ``after``, and the README up to it."""
    readme = (ROOT / "README.md").read_text("utf-8")
    at = readme.index(after)
    start = readme.index("```toml\n", at) + len("```toml\n")
    return readme[start : readme.index("```", start)], readme[at:start]


def test_the_worked_example_passes_check_config() -> None:
    done = check_config(EXAMPLE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{EXAMPLE}: OK · storage redis://redis.internal:6379/0")
    assert "backend openai · tiers free, pro · 1 key" in done.stdout.splitlines()[0][-40:]
    assert "1 keys" not in done.stdout


def test_the_readme_shows_the_example_file_as_it_is() -> None:
    example = EXAMPLE.read_text("utf-8")
    shown, _ = readme_toml_block("Worked example: vLLM on the same host")
    assert shown == example[example.index("[server]") :]


FLEET = ROOT / "examples" / "fleet.toml"


def test_the_fleet_example_passes_check_config_and_is_the_readmes() -> None:
    done = check_config(FLEET)
    assert done.returncode == 0, done.stderr
    assert "backends big (openai), small (openai), local (mock)" in done.stdout
    example = FLEET.read_text("utf-8")
    shown, before = readme_toml_block("### A fleet of model servers")
    assert shown == example[example.index("[[backends]]") :]
    for command in (line.removeprefix("#   ") for line in example.splitlines()[3:7]):
        assert command in before  # the commands that start it, as the file says


def test_the_readme_verify_sample_shows_the_built_in_default_digest_a_run_shows() -> None:
    digest = config_digest(load_config(None, environ={}))
    readme = (ROOT / "README.md").read_text("utf-8")
    shown = re.findall(r"digest[\" :(]+([0-9a-f]{16})", readme)
    assert shown == [digest, digest]  # the verify sample's text and its evidence record
