"""The README's first `openai` SDK example, taken from the README as it is printed, runs against
the README's first command's gateway (the built-in default on 127.0.0.1:8000)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from quotagate.testing import port_open
from support import QuotagateProcess

ROOT = Path(__file__).resolve().parents[2]


def sdk_example() -> str:
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme[readme.index("## `quotagate serve`: the gateway") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_the_readme_sdk_example_runs_against_the_built_in_default() -> None:
    code = sdk_example()
    assert 'base_url="http://127.0.0.1:8000/v1"' in code  # the README's own address
    assert not port_open(8000), "port 8000 is taken: the README's gateway cannot start"
    with QuotagateProcess("serve", "--port", "8000", port=8000):
        done = subprocess.run(
            [sys.executable, "-c", code + "\nprint(reply.choices[0].message.content)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("the cat sat")  # the mock model's answer
