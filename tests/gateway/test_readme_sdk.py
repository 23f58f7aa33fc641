"""The README's `openai` SDK examples, taken from the README as it is printed, run against the
README's first command's gateway (the built-in default on 127.0.0.1:8000): the first one's
answer, and the error example printing what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from quotagate.testing import port_open
from support import QuotagateProcess

ROOT = Path(__file__).resolve().parents[2]


def python_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    readme = (ROOT / "README.md").read_text("utf-8")
    match = re.search(r"```python\n(.*?)```", readme[readme.index(heading) :], re.S)
    assert match is not None
    return match.group(1)


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_readme_sdk_examples_run_against_the_built_in_default() -> None:
    first = python_block("## `quotagate serve`: the gateway")
    errors = python_block("### Errors in OpenAI's shape")
    for code in (first, errors):
        assert 'base_url="http://127.0.0.1:8000/v1"' in code  # the README's own address
    # What the error example's comments say it prints, in order.
    promised = re.findall(r"print\(.*\)  # (.*)", errors)
    assert len(promised) == 2
    assert not port_open(8000), "port 8000 is taken: the README's gateway cannot start"
    with QuotagateProcess("serve", "--port", "8000", port=8000):
        answer = _run(first + "\nprint(reply.choices[0].message.content)")
        printed = _run(errors)
    assert answer.strip().startswith("the cat sat")  # the mock model's answer
    assert printed.splitlines() == promised
