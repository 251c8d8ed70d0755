"""``chatd room ...`` as operators run it: real processes, embedded and Redis stores."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from tests.test_cli import Cli

CONFIG = """
[[rooms.namespaces]]
name = "team"
access = "members"
"""


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path)
    c.env["CHATD_CONFIG"] = c.write("c.toml", CONFIG)
    return c


def ok(cli: Cli, *args: str, env: dict[str, str] | None = None) -> str:
    result = cli("room", *args, env=env)
    assert result.code == 0, result.err
    assert result.err == ""
    return result.out


def refused(cli: Cli, *args: str, code: int = 2) -> str:
    result = cli("room", *args)
    assert result.code == code, (result.out, result.err)
    assert result.out == ""
    return result.error_line


def test_a_private_team_room_managed_from_the_command_line(cli: Cli) -> None:
    assert ok(cli, "create", "team:acme", "--owner", "alice") == "room team:acme: create ok\n"
    assert ok(cli, "add-member", "team:acme", "bob", "--role", "moderator") == \
        "room team:acme: add-member bob ok\n"
    ok(cli, "add-member", "team:acme", "carol")
    assert ok(cli, "members", "team:acme") == "alice\towner\nbob\tmoderator\ncarol\tmember\n"
    ok(cli, "remove-member", "team:acme", "carol")
    assert ok(cli, "members", "team:acme") == "alice\towner\nbob\tmoderator\n"
    listed = ok(cli, "list").splitlines()
    assert len(listed) == 1 and listed[0].startswith("team:acme\t20")
    assert listed[0].endswith("\talice")
    ok(cli, "delete", "team:acme")
    assert ok(cli, "list") == ""


def test_bans_and_mutes_with_and_without_duration(cli: Cli) -> None:
    ok(cli, "create", "team:acme")
    out = ok(cli, "ban", "team:acme", "eve", "--duration", "1h")
    assert out.startswith("room team:acme: ban eve until 20") and out.endswith("Z\n")
    assert ok(cli, "unban", "team:acme", "eve") == "room team:acme: unban eve ok\n"
    assert ok(cli, "ban", "general", "eve") == "room general: ban eve ok\n"  # open rooms too
    assert ok(cli, "mute", "general", "eve", "--duration", "90") .startswith(
        "room general: mute eve until")
    ok(cli, "unmute", "general", "eve")


def test_the_rooms_survive_between_commands_in_the_state_dir(cli: Cli, tmp_path: Path) -> None:
    ok(cli, "create", "team:acme", "--owner", "alice")
    assert (tmp_path / "state" / "chatd.sqlite3").is_file()
    assert ok(cli, "members", "team:acme") == "alice\towner\n"


@pytest.mark.parametrize(("args", "line"), [
    (("create", "team:acme"), "chatd room create: conflict: team:acme already exists"),
    (("create", "lobby"),
     "chatd room create: forbidden: rooms in namespace '' are open and need no create"),
    (("create", "x:y"), "chatd room create: forbidden: namespace 'x' is not open to users"),
    (("create", "bad room"), "chatd room create: invalid room name 'bad room'"),
    (("add-member", "team:acme", "a:b"), "chatd room add-member: invalid user name 'a:b'"),
    (("members", "team:none"), "chatd room members: not_found: no room team:none"),
    (("delete", "team:none"), "chatd room delete: not_found: no room team:none"),
    (("ban", "team:acme", "eve", "--duration", "soon"),
     "chatd room ban: --duration: must be a duration like 30s, 15m, 7d, got 'soon'"),
    (("ban", "team:acme", "eve", "--duration", "0"),
     "chatd room ban: --duration must be from 1 second to 10 years"),
    (("add-member", "team:acme", "bob", "--role", "king"), None),
])
def test_bad_usage_and_refusals_are_one_line_and_exit_2(cli: Cli, args: tuple[str, ...],
                                                        line: str | None) -> None:
    ok(cli, "create", "team:acme")
    got = refused(cli, *args)
    if line is None:
        assert "invalid choice: 'king'" in got
    else:
        assert got == line


def test_an_unreachable_redis_is_a_runtime_failure(cli: Cli, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "gone").start()
    url = server.url
    server.close()
    result = cli("room", "list", env={"CHATD_REDIS_URL": url})
    assert result.code == 1
    assert result.error_line == "chatd: backend unavailable, try again"


def test_the_redis_store_is_the_clusters(cli: Cli, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        env = {"CHATD_REDIS_URL": server.url}
        ok(cli, "create", "team:acme", "--owner", "alice", env=env)
        ok(cli, "add-member", "team:acme", "bob", env=env)
        assert ok(cli, "members", "team:acme", env=env) == "alice\towner\nbob\tmember\n"
        assert ok(cli, "list") == ""  # the embedded store is another one
        assert ok(cli, "list", env=env).startswith("team:acme\t")


async def test_a_ban_from_the_command_line_reaches_every_redis_node(cli: Cli,
                                                                    tmp_path: Path) -> None:
    import asyncio

    from chatd.backends.base import RoomChange
    from chatd.backends.redis import create_redis_backend
    from tests.backends.conftest import backend_config, eventually
    from tests.backends.test_rooms_contract import ChangeRecorder

    with RedisServer(tmp_path / "redis") as server:
        node = create_redis_backend(backend_config(server.url, node_id="a"))
        seen = ChangeRecorder("a")
        await node.broker.start(seen)
        try:
            await eventually(node.broker.healthy)
            env = {"CHATD_REDIS_URL": server.url}
            await asyncio.to_thread(ok, cli, "create", "team:acme", env=env)
            await asyncio.to_thread(ok, cli, "ban", "team:acme", "eve", env=env)
            await seen.wait_for(lambda r: r.changes)  # type: ignore[attr-defined]
            assert seen.changes == [RoomChange("team:acme", "eve", "banned")]
        finally:
            await node.broker.close()


def test_a_room_token_from_the_command_line_verifies_for_its_user_and_room(cli: Cli) -> None:
    import jwt as pyjwt

    from chatd.auth.keys import KeyRing
    from chatd.auth.room_tokens import verify_room_token
    from chatd.auth.tokens import TokenVerifier
    from chatd.config import Config, ServerConfig

    token = ok(cli, "token", "support:42", "alice", "--ttl", "10m", "--role", "moderator").strip()
    assert pyjwt.get_unverified_header(token)["typ"] == "room+jwt"
    ring, _ = KeyRing.from_config(Config(server=ServerConfig(state_dir=str(cli.state))))
    grant = verify_room_token(TokenVerifier(ring, leeway=30), token, user="alice",
                              room="support:42", clock=time.time)
    assert grant.room == "support:42" and grant.role == "moderator"
    assert refused(cli, "token", "support:42", "alice", "--ttl", "0") == \
        "chatd room token: --ttl must be positive"
