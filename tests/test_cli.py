"""The ``chatd`` command line as operators run it: real processes, a clean environment.

Every run goes through :func:`run`, which also checks the CLI contract's promise that a
failure is one line on stderr and never a traceback (../shared/spec/cli.md, "Exit codes").
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import argon2
import jwt
import pytest

from chatd.backends.sqlite.state import SqliteState

ROOT = Path(__file__).resolve().parents[1]
CONFIG_TOML = ROOT / "config.toml"
SECRET = "z" * 48
PASSWORD = "correct horse battery"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The single line a failing command prints on stderr."""
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {self.err!r}"
        return lines[0]


class Cli:
    """Runs ``python -m chatd`` with only PATH, HOME and CHATD_STATE_DIR set (plus extras)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path / "home"),
            "LANG": "C.UTF-8",
            "CHATD_STATE_DIR": str(self.state),
        }

    def __call__(self, *args: str, stdin: str | None = None,
                 env: dict[str, str] | None = None) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "chatd", *args],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            cwd=ROOT,
            timeout=60,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stdout, proc.stdout
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def write(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    @property
    def secret(self) -> str:
        return (self.state / "jwt-secret").read_text(encoding="utf-8").strip()


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens (bound, never listening: connects are refused,
    and no other process can take it meanwhile)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


# -- check-config ----------------------------------------------------------------------------


def test_check_config_accepts_the_shipped_config_toml(cli: Cli) -> None:
    result = cli("check-config", "-c", str(CONFIG_TOML))
    assert result.code == 0, result.err
    assert "config.toml" in result.out
    assert result.err == ""


def test_check_config_reads_chatd_config(cli: Cli) -> None:
    result = cli("check-config", env={"CHATD_CONFIG": str(CONFIG_TOML)})
    assert result.code == 0, result.err
    assert "config.toml" in result.out


def test_check_config_without_a_file_checks_the_defaults(cli: Cli) -> None:
    result = cli("check-config")
    assert result.code == 0, result.err
    assert "defaults" in result.out


def test_check_config_writes_nothing(cli: Cli) -> None:
    assert cli("check-config").code == 0
    assert not (cli.state / "jwt-secret").exists()


@pytest.mark.parametrize("text,named", [
    ("[limits]\nmax_frame_bytez = 1\n", "limits.max_frame_bytez"),
    ("[sever]\nport = 1\n", "sever"),
    ('[limits]\nburst = "many"\n', "limits.burst"),
    ('[auth]\nleeway = "10m"\n', "auth.leeway"),
    ('[server]\nping_interval = "often"\n', "server.ping_interval"),
    ('[metrics]\nallow = ["10.0.0.0/33"]\n', "metrics.allow[0]"),
    ('[[auth.keys]]\nkid = "a"\nalg = "HS256"\nsecret_env = "CHATD_TEST_UNSET_SECRET"\n',
     "auth.keys[0]"),
    ('[[auth.keys]]\nkid = "a"\nalg = "none"\nsecret_env = "HOME"\n', "auth.keys[0].alg"),
    ("[server\nport = 1\n", "bad.toml"),
])
def test_check_config_refuses_a_bad_file_with_one_line_naming_the_key(
        cli: Cli, text: str, named: str) -> None:
    result = cli("check-config", "-c", cli.write("bad.toml", text))
    assert result.code == 2
    assert named in result.error_line
    assert result.out == ""


def test_check_config_refuses_a_missing_file(cli: Cli) -> None:
    missing = str(cli.tmp / "nope.toml")
    result = cli("check-config", "-c", missing)
    assert result.code == 2
    assert missing in result.error_line


def test_check_config_refuses_a_short_secret_from_the_environment(cli: Cli) -> None:
    result = cli("check-config", env={"CHATD_JWT_SECRET": "tooshort-s3cret"})
    assert result.code == 2
    assert "CHATD_JWT_SECRET" in result.error_line
    assert "tooshort-s3cret" not in result.err


def test_check_config_refuses_a_bad_environment_value(cli: Cli) -> None:
    result = cli("check-config", env={"CHATD_PORT": "eighty"})
    assert result.code == 2
    assert "server.port" in result.error_line
    result = cli("check-config", env={"CHATD_REDIS_URL": "http://cache:6379"})
    assert result.code == 2
    assert "redis.url" in result.error_line


def test_serve_with_a_bad_config_exits_2_without_starting(cli: Cli) -> None:
    result = cli("serve", "-c", cli.write("bad.toml", "[limits]\nburst = 0\n"))
    assert result.code == 2
    assert "limits.burst" in result.error_line
    result = cli("serve", "--port", "70000")
    assert result.code == 2
    assert "server.port" in result.error_line


# -- token issue -----------------------------------------------------------------------------


def issued(result: Result) -> str:
    assert result.code == 0, result.err
    lines = result.out.strip().splitlines()
    assert len(lines) == 1, result.out
    token = lines[0]
    assert token.count(".") == 2
    return token


def test_token_issue_prints_one_token_signed_with_the_generated_secret(cli: Cli) -> None:
    token = issued(cli("token", "issue", "alice"))
    path = cli.state / "jwt-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(cli.secret.encode()) >= 32
    claims = jwt.decode(token, cli.secret, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == pytest.approx(900)  # the default --ttl 15m
    assert claims["jti"]
    assert "role" not in claims
    assert jwt.get_unverified_header(token)["typ"] in ("JWT", "at+jwt")


def test_token_issue_reuses_the_generated_secret(cli: Cli) -> None:
    first = issued(cli("token", "issue", "alice"))
    secret = cli.secret
    second = issued(cli("token", "issue", "bob"))
    assert cli.secret == secret
    assert jwt.decode(first, secret, algorithms=["HS256"])["sub"] == "alice"
    assert jwt.decode(second, secret, algorithms=["HS256"])["sub"] == "bob"


def test_token_issue_signs_with_chatd_jwt_secret_when_set(cli: Cli) -> None:
    token = issued(cli("token", "issue", "alice", env={"CHATD_JWT_SECRET": SECRET}))
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["sub"] == "alice"
    assert not (cli.state / "jwt-secret").exists()


@pytest.mark.parametrize("ttl,seconds", [("30s", 30), ("90", 90), ("7d", 604800)])
def test_token_issue_ttl(cli: Cli, ttl: str, seconds: int) -> None:
    token = issued(cli("token", "issue", "alice", "--ttl", ttl))
    claims = jwt.decode(token, cli.secret, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == pytest.approx(seconds)


def test_token_issue_admin_grants_the_admin_role(cli: Cli) -> None:
    token = issued(cli("token", "issue", "root", "--admin", "--ttl", "30s"))
    claims = jwt.decode(token, cli.secret, algorithms=["HS256"])
    assert (claims["sub"], claims["role"]) == ("root", "admin")


@pytest.mark.parametrize("user", ["_alice", "a" * 65, "bob:x", "ünïcode"])
def test_token_issue_refuses_an_invalid_user_name(cli: Cli, user: str) -> None:
    result = cli("token", "issue", user)
    assert result.code == 2
    assert "user" in result.error_line
    assert result.out == ""


@pytest.mark.parametrize("ttl", ["soon", "0s", "-5m"])
def test_token_issue_refuses_a_bad_ttl(cli: Cli, ttl: str) -> None:
    result = cli("token", "issue", "alice", f"--ttl={ttl}")
    assert result.code == 2
    assert "ttl" in result.error_line
    assert result.out == ""


# -- user ------------------------------------------------------------------------------------


def stored_hash(cli: Cli, user: str) -> str | None:
    """The password hash the state holds for ``user`` (read the way a node reads it)."""
    async def get() -> str | None:
        state = SqliteState.for_state_dir(cli.state)
        try:
            record = await state.get_user(user)
        finally:
            state.close()
        return None if record is None else record.password_hash

    return asyncio.run(get())


def listed(cli: Cli) -> list[str]:
    result = cli("user", "list")
    assert result.code == 0, result.err
    return result.out.splitlines()


def add(cli: Cli, user: str, password: str = PASSWORD) -> Result:
    return cli("user", "add", user, "--password-stdin", stdin=password + "\n")


def test_user_add_stores_an_argon2_hash_of_the_password_from_stdin(cli: Cli) -> None:
    result = add(cli, "bob")
    assert result.code == 0, result.err
    assert "bob" in result.out
    stored = stored_hash(cli, "bob")
    assert stored is not None and stored.startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(stored, PASSWORD)
    assert PASSWORD not in result.out + result.err


def test_user_list_shows_users_and_their_state(cli: Cli) -> None:
    assert listed(cli) == []
    assert add(cli, "bob").code == 0
    assert add(cli, "alice").code == 0
    assert listed(cli) == ["alice\tenabled", "bob\tenabled"]


def test_user_passwd_replaces_the_password(cli: Cli) -> None:
    assert add(cli, "bob").code == 0
    result = cli("user", "passwd", "bob", "--password-stdin", stdin="a brand new one\n")
    assert result.code == 0, result.err
    stored = stored_hash(cli, "bob")
    assert stored is not None
    assert argon2.PasswordHasher().verify(stored, "a brand new one")
    with pytest.raises(argon2.exceptions.VerifyMismatchError):
        argon2.PasswordHasher().verify(stored, PASSWORD)


def test_user_disable_and_enable(cli: Cli) -> None:
    assert add(cli, "bob").code == 0
    assert cli("user", "disable", "bob").code == 0
    assert listed(cli) == ["bob\tdisabled"]
    assert cli("user", "enable", "bob").code == 0
    assert listed(cli) == ["bob\tenabled"]


def test_user_delete(cli: Cli) -> None:
    assert add(cli, "bob").code == 0
    assert add(cli, "carol").code == 0
    result = cli("user", "delete", "bob")
    assert result.code == 0, result.err
    assert listed(cli) == ["carol\tenabled"]
    assert stored_hash(cli, "bob") is None


def test_user_add_of_an_existing_user_is_refused(cli: Cli) -> None:
    assert add(cli, "bob").code == 0
    before = stored_hash(cli, "bob")
    result = add(cli, "bob", "another password")
    assert result.code == 2
    assert "bob" in result.error_line and "exists" in result.error_line
    assert stored_hash(cli, "bob") == before


@pytest.mark.parametrize("action", ["passwd", "disable", "enable", "delete"])
def test_user_commands_on_an_unknown_user_exit_2_naming_it(cli: Cli, action: str) -> None:
    assert add(cli, "bob").code == 0
    stdin = "whatever password\n" if action == "passwd" else None
    args = ["user", action, "nobody"] + (["--password-stdin"] if action == "passwd" else [])
    result = cli(*args, stdin=stdin)
    assert result.code == 2
    assert "nobody" in result.error_line
    assert listed(cli) == ["bob\tenabled"]


@pytest.mark.parametrize("user", ["_bob", "b" * 65, "bob smith", "bob:x"])
def test_user_add_refuses_an_invalid_user_name(cli: Cli, user: str) -> None:
    result = add(cli, user)
    assert result.code == 2
    assert "user" in result.error_line
    assert listed(cli) == []


def test_user_add_refuses_a_short_password(cli: Cli) -> None:
    result = add(cli, "bob", "tiny7")
    assert result.code == 2
    assert "password" in result.error_line
    assert "tiny7" not in result.err
    assert listed(cli) == []


def test_user_add_without_a_terminal_asks_for_password_stdin(cli: Cli) -> None:
    result = cli("user", "add", "bob")  # stdin is /dev/null, not a terminal
    assert result.code == 2
    assert "--password-stdin" in result.error_line
    assert listed(cli) == []


# -- admin -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["admin", "kick", "bob"],
    ["admin", "revoke-tokens", "bob"],
    ["admin", "disable", "bob"],
    ["admin", "revoke-jti", "some-jti"],
])
def test_admin_without_a_running_server_exits_1_with_one_line(
        cli: Cli, closed_port: int, args: list[str]) -> None:
    result = cli(*args, "--url", f"ws://127.0.0.1:{closed_port}/ws")
    assert result.code == 1
    assert str(closed_port) in result.error_line
    assert result.out == ""


def test_admin_finds_the_node_from_the_config(cli: Cli, closed_port: int) -> None:
    result = cli("admin", "kick", "bob", env={"CHATD_PORT": str(closed_port)})
    assert result.code == 1
    assert f"127.0.0.1:{closed_port}" in result.error_line


def test_admin_with_a_url_that_is_not_ws_exits_2(cli: Cli) -> None:
    result = cli("admin", "kick", "bob", "--url", "http://127.0.0.1:1/ws")
    assert result.code == 2
    assert "ws://" in result.error_line


def test_admin_refuses_an_invalid_user_name(cli: Cli, closed_port: int) -> None:
    result = cli("admin", "kick", "_bob", "--url", f"ws://127.0.0.1:{closed_port}/ws")
    assert result.code == 2
    assert "user" in result.error_line


# -- usage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    [],
    ["bogus"],
    ["token"],
    ["token", "issue"],
    ["user"],
    ["user", "add"],
    ["admin"],
    ["admin", "kick"],
    ["admin", "ban", "bob"],
    ["admin", "revoke-jti", "j", "--exp", "tomorrow"],
    ["serve", "--port", "http"],
    ["check-config", "--no-such-flag"],
    ["check-config", "-c"],
])
def test_bad_usage_exits_2_with_one_line(cli: Cli, args: list[str]) -> None:
    result = cli(*args)
    assert result.code == 2
    assert result.error_line.startswith("chatd")
    assert result.out == ""


def test_version_prints_the_version(cli: Cli) -> None:
    result = cli("--version")
    assert result.code == 0
    assert result.out.strip().startswith("chatd ")


def test_help_exits_0(cli: Cli) -> None:
    result = cli("--help")
    assert result.code == 0
    for command in ("serve", "check-config", "token", "user", "admin"):
        assert command in result.out
