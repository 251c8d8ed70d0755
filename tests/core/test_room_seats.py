"""Seat: what a join decided, kept true by room changes and by the clock (plain calls)."""

from __future__ import annotations

import math

from chatd.backends.base import RoomStanding
from chatd.config import RoomNamespace
from chatd.core.room_seats import Seat
from chatd.core.rooms import Actor, Allowed, Grant, Refusal

NOW = 1_800_000_000.0
MEMBERS = RoomNamespace(name="team", access="members")
TOKEN = RoomNamespace(name="paid", access="token")
BOB = Actor("bob")


def seat(role: str | None = "member", **standing: float | None) -> Seat:
    return Seat.take("team:acme", Allowed(role), RoomStanding(True, role, **standing))


def test_a_muted_seat_may_view_but_not_send_until_the_mute_ends() -> None:
    s = seat(muted_until=NOW + 10)
    assert s.may_view(NOW) is None
    assert s.may_send(NOW) == Refusal("forbidden", f"muted until {int(NOW) + 10}")
    assert s.may_send(NOW + 10) is None


def test_an_admin_seat_is_never_muted() -> None:
    s = Seat.take("team:acme", Allowed("owner", admin=True),
                  RoomStanding(True, None, muted_until=math.inf))
    assert s.may_send(NOW) is None


def test_a_seat_on_a_room_token_lapses_with_it() -> None:
    grant = Grant("paid:1", None, NOW + 60)
    s = Seat.take("paid:1", Allowed(None, until=NOW + 60), RoomStanding(), grant)
    assert s.may_send(NOW + 59) is None
    for check in (s.may_view, s.may_send):
        assert check(NOW + 60) == Refusal("forbidden", "paid:1 is not granted by your token")


def test_removal_and_ban_take_the_seat_with_their_reason() -> None:
    assert seat().changed(MEMBERS, BOB, RoomStanding(True, None), NOW) == "removed"
    banned = RoomStanding(True, "member", banned_until=NOW + 5)
    assert seat().changed(MEMBERS, BOB, banned, NOW) == "banned"
    assert seat().changed(MEMBERS, BOB, RoomStanding(False, None), NOW) == "removed"


def test_a_mute_or_a_new_role_updates_the_seat_in_place() -> None:
    s = seat()
    assert s.changed(MEMBERS, BOB, RoomStanding(True, "moderator", muted_until=NOW + 5),
                     NOW) is None
    assert s.verdict.role == "moderator" and s.may_send(NOW) is not None
    assert s.may_delete("someone", "bob") is None
    assert s.changed(MEMBERS, BOB, RoomStanding(True, "member"), NOW) is None
    assert s.may_send(NOW) is None
    assert s.may_delete("someone", "bob") == Refusal(
        "forbidden", "only the author or a moderator may delete a message")
    assert s.may_delete("bob", "bob") is None


def test_in_a_token_room_the_grant_keeps_the_seat_through_a_list_change() -> None:
    grant = Grant("paid:1", None, NOW + 60)
    s = Seat.take("paid:1", Allowed(None, until=NOW + 60), RoomStanding(), grant)
    assert s.changed(TOKEN, BOB, RoomStanding(False, "moderator"), NOW) is None
    assert s.verdict.role == "moderator"
    assert s.changed(TOKEN, BOB, RoomStanding(banned_until=math.inf), NOW) == "banned"
