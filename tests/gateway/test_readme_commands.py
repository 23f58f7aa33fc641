"""Every command the README prints runs as written in a fresh shell after its first command, and
prints what the README shows: each is taken from the README (a line of a ``sh`` block, or a
``$ `` line of a shown session), never copied here. The servers a command needs (the README's
gateway on 127.0.0.1:8000, the fleet's mocks) are started as the README starts them and stopped
by their process ids."""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotagate.testing import ServerProcess, port_open

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text("utf-8")
#: What a fresh shell finds besides the checkout's own paths.
SHELL_TOOLS = {"curl", "echo", "kill", "sed", "grep"}
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


class Shown:
    """One ``$ `` command of a shown session and the output the README prints under it."""

    def __init__(self, command: str, output: list[str]) -> None:
        self.command = command
        self.output = output


def blocks(language: str) -> list[list[str]]:
    """The lines of each fenced block of ``language`` ("" for a block without one)."""
    found: list[list[str]] = []
    current: list[str] | None = None
    current_language = ""
    for line in README.splitlines():
        if line.strip().startswith("```"):
            if current is None:
                current, current_language = [], line.strip()[3:]
            else:
                if current_language == language:
                    found.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return found


def sessions() -> list[Shown]:
    shown: list[Shown] = []
    for block in blocks(""):
        current: Shown | None = None  # a session ends with its block
        for line in block:
            if line.startswith("$ "):
                current = Shown(line[2:], [])
                shown.append(current)
            elif current is not None and current.command.endswith("\\"):
                current.command = current.command[:-1] + line.strip()  # continued
            elif current is not None:
                current.output.append(line)
    return shown


def sh_lines() -> list[str]:
    return [line for block in blocks("sh") for line in block if line.strip()]


def shown(prefix: str) -> Shown:
    matches = [s for s in sessions() if s.command.startswith(prefix)]
    assert len(matches) == 1, (prefix, [s.command for s in sessions()])
    return matches[0]


def run(command: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``command`` in a fresh shell (bash, no virtual environment on PATH) in ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    venvs = {str(Path(sys.prefix) / "bin"), str(ROOT / ".venv" / "bin")}
    env["PATH"] = os.pathsep.join(
        entry for entry in env.get("PATH", "").split(os.pathsep) if entry not in venvs
    )
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module", autouse=True)
def after_the_first_command() -> None:
    """The README's commands come after its first one, which set the checkout's .venv up: its
    one-time "installing quotagate" notice is no output of theirs."""
    done = run("scripts/quotagate --version", ROOT, timeout=600)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A directory of the user's with the checkout's ``scripts`` in it: commands run there
    read and write the user's files, not the checkout's."""
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    return tmp_path


def serve_argv(line: str) -> list[str]:
    """A README server line as an argv (the shell's trailing ``&`` is ServerProcess's job)."""
    return shlex.split(line.removesuffix("&").strip())


@pytest.fixture
def readme_gateway() -> Iterator[None]:
    """The README's first command's gateway: the built-in default on 127.0.0.1:8000."""
    assert not port_open(8000), "port 8000 is taken: the README's gateway cannot start"
    first = sh_lines()[0]
    assert first == "scripts/serve"
    with ServerProcess([str(ROOT / first)], name="serve", port=8000, cwd=ROOT):
        yield


def test_every_command_is_one_a_fresh_shell_has() -> None:
    commands = sh_lines() + [s.command for s in sessions()]
    assert len(commands) >= 10
    for command in commands:
        words = shlex.split(command)
        program = next(word for word in words if not ENV_ASSIGNMENT.match(word))
        if program in SHELL_TOOLS:
            continue
        path = ROOT / program
        assert path.is_file(), f"{command!r}: {program} is no file of the checkout"
        assert os.access(path, os.X_OK), f"{command!r}: {program} is not executable"


def test_check_config_prints_each_problem_and_exits_2(elsewhere: Path) -> None:
    check = shown("scripts/quotagate check-config")
    (elsewhere / "broken.toml").write_text(
        '[anonymous]\ntier = "anonymous"\n\n[tiers.anonymous]\nrequests = "10/minute"\n\n'
        '[tiers.free]\nrequests = "60 a minute"\n\n[[keys]]\nkey = "sk-x-0001"\ntier = "gold"\n',
        "utf-8",
    )
    done = run(check.command, elsewhere)
    assert done.stderr.splitlines() == check.output
    assert (shown("echo $?").output, done.returncode) == (["2"], 2)


def test_verify_passes_every_check_it_shows_and_writes_the_report_here(elsewhere: Path) -> None:
    verify = shown("scripts/quotagate verify")
    done = run(verify.command, elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    verdicts = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert verdicts == [line for line in verify.output if line.startswith(("PASS", "FAIL"))]
    report = shlex.split(verify.command)[shlex.split(verify.command).index("--report") + 1]
    assert (elsewhere / report).is_file()  # in the caller's directory
    assert not (ROOT / report).exists()


@pytest.mark.usefixtures("readme_gateway")
def test_bench_against_the_readme_gateway_prints_the_sections_shown(elsewhere: Path) -> None:
    for bench in (s for s in sessions() if s.command.startswith("scripts/quotagate bench")):
        done = run(bench.command, elsewhere)
        assert done.returncode == 0, done.stdout + done.stderr
        headings = [line for line in done.stdout.splitlines() if re.fullmatch(r"\S.*:", line)]
        promised = [line for line in bench.output if re.fullmatch(r"\S.*:", line)]
        assert set(promised) <= set(headings), (promised, done.stdout)
        if "-n 200" in bench.command:
            counts = re.search(r"by code +\[200\] (\d+), \[429\] (\d+)", done.stdout)
            assert counts is not None, done.stdout
            admitted, limited = map(int, counts.groups())
            total = re.search(r"Total: +([\d.]+) s", done.stdout)
            assert total is not None, done.stdout
            refills = math.ceil(float(total.group(1)) / 6)  # 10/minute: one every 6 s
            # Anonymous: 10 a minute, one at a time: 10 of the 200 pass, as the README says.
            assert admitted + limited == 200
            assert 10 <= admitted <= 10 + refills
            waits = re.search(r"Retry-After \(s\) +(.*)", done.stdout)
            assert waits is not None, done.stdout
            assert {w.split(" x")[0] for w in waits.group(1).split(", ")} <= {"1", "6"}
        else:
            assert re.search(r"Streams \(40\):", done.stdout), done.stdout


@pytest.mark.usefixtures("readme_gateway")
def test_the_first_curl_gets_the_headers_shown() -> None:
    curl = shown("curl -si localhost:8000/v1/chat/completions")
    done = run(curl.command, ROOT)
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
    names = [line.split(":")[0].lower() for line in head.splitlines()[1:]]
    shown_head = curl.output[: curl.output.index("")]
    assert head.splitlines()[0] == shown_head[0] == "HTTP/1.1 200 OK"
    shown_names = [line.split(":")[0] for line in shown_head[1:]]
    assert [n for n in names if n in shown_names] == shown_names
    assert body.startswith('{"id":"chatcmpl-')


def test_the_fleet_runs_as_shown(tmp_path: Path) -> None:
    lines = sh_lines()
    start = lines.index(next(line for line in lines if line.endswith("--model llama-3-70b &")))
    mocks, serve = lines[start : start + 3], lines[start + 3]
    assert serve == "scripts/quotagate serve --config examples/fleet.toml"
    assert not port_open(8000), "port 8000 is taken: the README's gateway cannot start"
    processes = []
    try:
        for line in mocks:
            port = int(re.search(r"--port (\d+)", line).group(1))  # type: ignore[union-attr]
            processes.append(
                ServerProcess(serve_argv(line), name=f"mock-{port}", port=port, cwd=ROOT)
            )
        processes.append(ServerProcess(serve_argv(serve), name="fleet", port=8000, cwd=ROOT))
        for process in processes:
            process.start()
        for curl in (s for s in sessions() if s.command.startswith("curl -s localhost:8000")):
            done = run(curl.command, tmp_path)
            assert done.returncode == 0, done.stderr
            (expected,) = curl.output
            pattern = ".*?".join(map(re.escape, expected.split("...")))
            assert re.fullmatch(pattern, done.stdout.strip()), (done.stdout, expected)
    finally:
        for process in reversed(processes):
            process.close()


def test_the_admin_api_example_creates_a_key_as_shown(elsewhere: Path) -> None:
    (serve,) = [line for line in sh_lines() if "examples/tenants.toml" in line]
    create = shown("QUOTAGATE_ADMIN_KEY=adm-change-me scripts/quotagate keys create")
    assignment, *argv = shlex.split(serve)
    name, _, value = assignment.partition("=")
    assert not port_open(8000), "port 8000 is taken: the README's gateway cannot start"
    env = {**os.environ, name: value}
    with ServerProcess(argv, name="tenants", port=8000, cwd=ROOT, env=env):
        done = run(create.command, elsewhere)
    assert done.returncode == 0, done.stderr
    fields = [line.split()[0] for line in done.stdout.splitlines()]
    assert fields == [line.split()[0] for line in create.output]
    assert re.match(r"secret \(shown this once\): sk-\S+$", done.stdout.splitlines()[0])
    assert done.stdout.splitlines()[-1] == create.output[-1]  # limits {"requests": "1200/minute"}
