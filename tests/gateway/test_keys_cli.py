"""``quotagate keys create|list|show|update|revoke|rotate --url URL`` against a real gateway
process (its admin key in the environment), the issued key used by the `openai` SDK."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from helpers import run_cli
from support import QuotagateProcess, python_env

ADMIN = "adm-cli-0123456789abcdef"
CONFIG = """
[admin]
key_env = "QUOTAGATE_ADMIN_KEY"

[tiers.pro]
requests = "100/minute"
tokens = "100000/minute"
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("keys-cli") / "gateway.toml"
    path.write_text(CONFIG, "utf-8")
    env = python_env(QUOTAGATE_ADMIN_KEY=ADMIN)
    with QuotagateProcess("serve", "--config", str(path), "--port", "{port}", env=env) as process:
        yield process.url


def keys(
    *args: str, admin: str | None = ADMIN, key_file: Path | None = None
) -> tuple[int, str, str]:
    env = {"QUOTAGATE_ADMIN_KEY": admin} if admin is not None else {"QUOTAGATE_ADMIN_KEY": ""}
    extra = ["--admin-key-file", str(key_file)] if key_file is not None else []
    done = run_cli("keys", *args, *extra, env=env)
    return done.returncode, done.stdout, done.stderr


def sdk_status(url: str, key: str) -> int:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    try:
        client.completions.create(model="quotagate-mock", prompt="hi", max_tokens=1)
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_create_prints_the_secret_once_and_it_works(gateway: str) -> None:
    code, out, err = keys("create", "--url", gateway, "--tier", "pro", "--name", "acme")
    assert code == 0, err
    secret = re.search(r"^secret \(shown this once\): (sk-\S+)$", out, re.M)
    key_id = re.search(r"^id +(key_[0-9a-f]{16})$", out, re.M)
    assert secret is not None
    assert key_id is not None
    assert sdk_status(gateway, secret.group(1)) == 200

    code, listed, _ = keys("list", "--url", gateway)
    assert code == 0
    assert key_id.group(1) in listed
    assert secret.group(1) not in listed
    code, shown, _ = keys("show", key_id.group(1), "--url", gateway)
    assert (code, "secret" in shown, "acme" in shown) == (0, False, True)


def test_update_rotate_and_revoke(gateway: str, tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN + "\n", "utf-8")
    code, out, err = keys(
        "create", "--url", gateway, "--tier", "pro", admin=None, key_file=key_file
    )
    assert code == 0, err
    key_id = re.search(r"^id +(key_\w+)$", out, re.M).group(1)  # type: ignore[union-attr]
    first = re.search(r": (sk-\S+)$", out, re.M).group(1)  # type: ignore[union-attr]

    code, updated, err = keys("update", key_id, "--url", gateway, "--requests", "1/minute")
    assert code == 0, err
    assert '"requests": "1/minute"' in updated
    assert [sdk_status(gateway, first), sdk_status(gateway, first)] == [200, 429]

    code, rotated, err = keys("rotate", key_id, "--url", gateway)
    assert code == 0, err
    second = re.search(r": (sk-\S+)$", rotated, re.M).group(1)  # type: ignore[union-attr]
    assert second != first
    assert sdk_status(gateway, first) == 401  # no grace: the old secret is over
    assert sdk_status(gateway, second) == 429  # the same key: its counter carried over

    code, revoked, err = keys("revoke", key_id, "--url", gateway)
    assert code == 0, err
    assert "revoked_at" in revoked
    assert sdk_status(gateway, second) == 401


def test_errors_are_one_line_with_their_exit_codes(gateway: str) -> None:
    wrong = keys("list", "--url", gateway, admin="not-the-admin-key")
    missing = keys("list", "--url", gateway, admin=None)
    unknown = keys("show", "key_0123456789abcdef", "--url", gateway)
    nobody = keys("list", "--url", "http://127.0.0.1:9")
    assert (wrong[0], wrong[2].strip()) == (
        1,
        "error: invalid_admin_key: The admin key is missing or not valid.",
    )
    assert missing[0] == 2
    assert "QUOTAGATE_ADMIN_KEY" in missing[2]
    assert unknown[0] == 1
    assert unknown[2].startswith("error: key_not_found:")
    assert nobody[0] == 2
    assert "cannot reach the gateway" in nobody[2]


def test_usage_prints_a_table_or_csv(gateway: str) -> None:
    code, out, err = keys("create", "--url", gateway, "--tier", "pro")
    assert code == 0, err
    key_id = re.search(r"^id +(key_\w+)$", out, re.M).group(1)  # type: ignore[union-attr]
    secret = re.search(r": (sk-\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    assert [sdk_status(gateway, secret) for _ in range(2)] == [200, 200]
    env = {"QUOTAGATE_ADMIN_KEY": ADMIN}
    table = run_cli("usage", "--url", gateway, "--key", key_id, env=env)
    as_csv = run_cli(
        "usage", "--url", gateway, "--key", key_id, "--group-by", "model", "--csv", env=env
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("usage ")
    assert lines[0].endswith(" by day")
    assert lines[1].split() == [
        "day",
        "requests_admitted",
        "requests_rejected",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    ]
    assert lines[-1].split()[:3] == ["total", "2", "0"]
    assert lines[-1].split()[-1] == "0.0"  # the mock model has no price here
    assert as_csv.returncode == 0, as_csv.stderr
    header, row = as_csv.stdout.splitlines()
    assert header == (
        "model,requests_admitted,requests_rejected,prompt_tokens,completion_tokens,cost_usd"
    )
    assert row.startswith("quotagate-mock,2,0,")
