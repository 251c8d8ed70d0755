"""RoomService: the policy applied to a real room store (SQLite), with the changes it reports.

The store is the embedded one on a temporary file; ``notify`` records what live connections
would be told, so removal and ban reaching them is checked here at the source.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatd.backends.base import RoomMember
from chatd.backends.sqlite.rooms import SqliteRooms
from chatd.config import RoomNamespace
from chatd.core.room_commands import AddMember, Create, Lift, Members, RemoveMember, Restrict
from chatd.core.rooms import Actor, Grant, Policies
from chatd.errors import CommandError
from chatd.room_service import RoomChange, RoomService
from tests.clock import Clock

T0 = 1_800_000_000.0
POLICIES = Policies([RoomNamespace(name="team", access="members", allow_create=True),
                     RoomNamespace(name="ops", access="members"),
                     RoomNamespace(name="paid", access="token")])
ALICE, BOB, CAROL, ADMIN = Actor("alice"), Actor("bob"), Actor("carol"), Actor("root", True)


class Env:
    def __init__(self, path: Path) -> None:
        self.clock = Clock(T0)
        self.store = SqliteRooms.open(path, clock=self.clock)
        self.changes: list[RoomChange] = []
        self.service = RoomService(self.store, POLICIES, notify=self._record, clock=self.clock)

    async def _record(self, change: RoomChange) -> None:
        self.changes.append(change)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path / "chatd.sqlite3")
    yield e
    e.store.close()


def refused(info: pytest.ExceptionInfo[CommandError]) -> tuple[str, str]:
    return str(info.value.code), info.value.message


async def test_a_private_team_room_from_creation_to_moderation(env: Env) -> None:
    s = env.service
    await s.create(ALICE, Create("team:acme"))
    await s.add_member(ALICE, AddMember("team:acme", "bob", "moderator"))
    await s.add_member(BOB, AddMember("team:acme", "carol"))
    page, nxt = await s.members(CAROL, Members("team:acme"))
    assert page == [RoomMember("alice", "owner"), RoomMember("bob", "moderator"),
                    RoomMember("carol", "member")] and nxt is None
    assert (await s.may_join(CAROL, "team:acme"))[0].role == "member"
    await s.restrict(BOB, Restrict("mute", "team:acme", "carol", 60))
    with pytest.raises(CommandError) as info:
        await s.may_send(CAROL, "team:acme")
    assert refused(info) == ("forbidden", f"muted until {int(T0) + 60}")
    env.clock.advance(60)
    await s.may_send(CAROL, "team:acme")  # the mute ended by itself
    await s.remove_member(BOB, RemoveMember("team:acme", "carol"))
    with pytest.raises(CommandError) as info:
        await s.may_join(CAROL, "team:acme")
    assert refused(info) == ("forbidden", "not a member of team:acme")
    assert env.changes == [RoomChange("team:acme", "bob"), RoomChange("team:acme", "carol"),
                           RoomChange("team:acme", "carol"),
                           RoomChange("team:acme", "carol", "removed")]


async def test_create_twice_is_a_conflict_and_closed_namespaces_refuse(env: Env) -> None:
    await env.service.create(ALICE, Create("team:x"))
    with pytest.raises(CommandError) as info:
        await env.service.create(BOB, Create("team:x", ref="r1"))
    assert refused(info) == ("conflict", "team:x already exists") and info.value.ref == "r1"
    with pytest.raises(CommandError) as info:
        await env.service.create(ALICE, Create("ops:x"))
    assert info.value.code == "forbidden"
    await env.service.create(ADMIN, Create("ops:x"))
    assert (await env.store.info("ops:x")) is not None
    assert await env.store.members("ops:x", None, 10) == []  # admins own everything anyway


async def test_a_ban_takes_the_room_and_ends_by_itself(env: Env) -> None:
    s = env.service
    await s.create(ALICE, Create("team:acme"))
    await s.add_member(ALICE, AddMember("team:acme", "bob"))
    until = await s.restrict(ALICE, Restrict("ban", "team:acme", "bob", 30))
    assert until == T0 + 30
    assert env.changes[-1] == RoomChange("team:acme", "bob", "banned")
    for check in (s.may_join, s.access, s.may_send):
        with pytest.raises(CommandError) as info:
            await check(BOB, "team:acme")
        assert refused(info) == ("forbidden", f"banned until {int(T0) + 30}")
    env.clock.advance(30)
    await s.may_join(BOB, "team:acme")


async def test_unban_lifts_a_permanent_ban_and_is_idempotent(env: Env) -> None:
    s = env.service
    assert await s.restrict(ADMIN, Restrict("ban", "general", "eve")) == \
        math.inf
    await s.lift(ADMIN, Lift("ban", "general", "eve"))
    await s.lift(ADMIN, Lift("ban", "general", "eve"))
    await s.may_send(Actor("eve"), "general")
    assert env.changes == [RoomChange("general", "eve", "banned"), RoomChange("general", "eve")]


async def test_the_member_list_pages_with_next(env: Env) -> None:
    await env.service.create(ALICE, Create("team:big"))
    for i in range(5):
        await env.service.add_member(ALICE, AddMember("team:big", f"u{i}"))
    page, nxt = await env.service.members(ALICE, Members("team:big", limit=3))
    assert [m.user for m in page] == ["alice", "u0", "u1"] and nxt == "u1"
    page, nxt = await env.service.members(ALICE, Members("team:big", after=nxt, limit=3))
    assert [m.user for m in page] == ["u2", "u3", "u4"] and nxt is None


async def test_an_outsider_learns_nothing_about_a_room_it_cannot_see(env: Env) -> None:
    await env.service.create(ADMIN, Create("ops:secret"))
    await env.service.create(ALICE, Create("team:secret"))
    answers = {}
    for room in ("ops:secret", "ops:missing", "team:secret", "team:missing"):
        with pytest.raises(CommandError) as info:
            await env.service.members(CAROL, Members(room))
        answers[room] = refused(info)
    # The same answer, but for the name, whether the room exists or not.
    assert answers["ops:secret"] == ("forbidden", "not a member of ops:secret")
    assert answers["ops:missing"] == ("forbidden", "not a member of ops:missing")
    assert answers["team:secret"] == ("forbidden", "not a member of team:secret")
    # team allows create: existence is no secret there (create answers conflict), and
    # not_found tells the user they may create it.
    assert answers["team:missing"] == ("not_found", "no room team:missing")


async def test_token_rooms_take_a_grant_and_its_role(env: Env) -> None:
    s = env.service
    with pytest.raises(CommandError) as info:
        await s.may_join(CAROL, "paid:1")
    assert refused(info) == ("forbidden", "paid:1 is not granted by your token")
    grant = Grant("paid:1", "moderator", T0 + 60)
    assert (await s.may_join(CAROL, "paid:1", grant))[0].role == "moderator"
    await s.restrict(CAROL, Restrict("mute", "paid:1", "bob"), grant)
    assert (await s.may_join(Actor("bob", claim=("paid:*",)), "paid:1"))[1].muted_until == \
        math.inf


async def test_a_full_room_refuses_a_new_user(env: Env) -> None:
    small = RoomService(env.store, Policies([RoomNamespace(name="", max_members=1)]),
                        clock=env.clock)
    await small.may_join(ALICE, "lobby", online=0)
    with pytest.raises(CommandError) as info:
        await small.may_join(BOB, "lobby", online=1)
    assert refused(info) == ("forbidden", "lobby is full (1 users online)")


async def test_deleting_a_room_tells_everyone_in_it(env: Env) -> None:
    await env.service.create(ALICE, Create("team:gone"))
    assert await env.service.delete_room("team:gone") is True
    assert await env.service.delete_room("team:gone") is False
    assert env.changes == [RoomChange("team:gone", "", "deleted")]


async def test_a_reload_changes_the_policy_for_the_next_check(env: Env) -> None:
    await env.service.may_join(BOB, "lobby")
    env.service.policies = Policies([RoomNamespace(name="", access="members")])
    with pytest.raises(CommandError):
        await env.service.may_join(BOB, "lobby")
