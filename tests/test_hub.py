"""chatd.hub: local rooms and users, two-step joins, fan-out framed once, control matching.

Members are plain objects recording what they are written; the framer counts its calls, so
"framed once per fan-out" is checked, not assumed. The last tests check the real framer the
shell uses (``chatd.connection.text_frame``) against RFC 6455 section 5.2.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from chatd.backends.base import CloseMatching
from chatd.connection import text_frame
from chatd.hub import Hub

_ids = itertools.count(1)


@dataclass(eq=False)
class FakeMember:
    """A local connection as the hub sees it; ``written`` keeps every frame, in order."""

    user: str
    sid: str | None = None
    jti: str = ""
    iat: float = 0.0
    conn_id: str = field(default_factory=lambda: f"node-a/{next(_ids)}")
    written: list[bytes] = field(default_factory=list)
    on_write: Callable[[bytes], None] | None = None

    def write(self, raw: bytes) -> None:
        self.written.append(raw)
        if self.on_write is not None:
            self.on_write(raw)


class Framer:
    """Wraps a payload so the test can tell framed bytes apart, and counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, payload: bytes) -> bytes:
        self.calls += 1
        return b"F[" + payload + b"]"


@pytest.fixture
def framer() -> Framer:
    return Framer()


@pytest.fixture
def hub(framer: Framer) -> Hub:
    return Hub(framer)


def live(hub: Hub, room: str, *members: FakeMember) -> None:
    for m in members:
        hub.add(m)
        hub.join(room, m)
        hub.activate(room, m, None)


# -- users -----------------------------------------------------------------------------------


def test_add_counts_a_users_local_connections(hub: Hub) -> None:
    assert hub.add(FakeMember("alice")) == 1
    assert hub.add(FakeMember("alice")) == 2
    assert hub.add(FakeMember("bob")) == 1
    assert (hub.user_count("alice"), hub.user_count("bob"), hub.users) == (2, 1, 2)


def test_remove_forgets_a_user_with_no_connection_left(hub: Hub) -> None:
    a1, a2 = FakeMember("alice"), FakeMember("alice")
    hub.add(a1)
    hub.add(a2)
    hub.remove(a1)
    assert (hub.user_count("alice"), hub.users) == (1, 1)
    hub.remove(a2)
    assert (hub.user_count("alice"), hub.users) == (0, 0)
    assert hub.all_members() == []
    hub.remove(a2)  # twice is harmless


# -- rooms: join, activate, leave ------------------------------------------------------------


def test_a_pending_member_gets_nothing_until_activated(hub: Hub) -> None:
    m = FakeMember("alice")
    hub.add(m)
    hub.join("general", m)
    hub.deliver_room("general", "5-0", b"m5")
    assert m.written == []
    assert hub.members("general") == 1


def test_activate_flushes_only_frames_newer_than_the_given_id_and_frames_without_id(
        hub: Hub) -> None:
    m = FakeMember("alice")
    hub.add(m)
    hub.join("general", m)
    hub.deliver_room("general", "4-0", b"m4")
    hub.deliver_room("general", "5-0", b"m5")
    hub.deliver_room("general", None, b"presence")
    hub.deliver_room("general", "5-1", b"m5.1")
    hub.deliver_room("general", "6-0", b"m6")
    hub.activate("general", m, "5-0")
    assert m.written == [b"F[presence]", b"F[m5.1]", b"F[m6]"]


def test_activate_compares_ids_as_numbers_not_strings(hub: Hub) -> None:
    m = FakeMember("alice")
    hub.add(m)
    hub.join("r", m)
    for msg_id in ("9-0", "9-2", "9-10", "10-0", "100-0"):
        hub.deliver_room("r", msg_id, msg_id.encode())
    hub.activate("r", m, "9-2")
    assert m.written == [b"F[9-10]", b"F[10-0]", b"F[100-0]"]


def test_activate_without_an_id_flushes_everything_buffered_in_order(hub: Hub) -> None:
    m = FakeMember("alice")
    hub.add(m)
    hub.join("r", m)
    hub.deliver_room("r", "1-0", b"a")
    hub.deliver_room("r", None, b"b")
    hub.deliver_room("r", "2-0", b"c")
    hub.activate("r", m, None)
    assert m.written == [b"F[a]", b"F[b]", b"F[c]"]


def test_after_activation_frames_are_delivered_live(hub: Hub) -> None:
    m = FakeMember("alice")
    hub.add(m)
    hub.join("r", m)
    hub.deliver_room("r", "1-0", b"old")
    hub.activate("r", m, "1-0")
    assert m.written == []
    assert hub.deliver_room("r", "2-0", b"new") == 1
    assert m.written == [b"F[new]"]


def test_frames_buffered_for_one_pending_member_do_not_affect_live_members(hub: Hub) -> None:
    a, b = FakeMember("alice"), FakeMember("bob")
    live(hub, "r", a)
    hub.add(b)
    hub.join("r", b)
    assert hub.deliver_room("r", "3-0", b"x") == 1
    assert a.written == [b"F[x]"]
    hub.activate("r", b, "2-0")
    assert b.written == [b"F[x]"]
    assert a.written == [b"F[x]"]
    assert hub.members("r") == 2


def test_deliver_room_reaches_every_live_member_once(hub: Hub) -> None:
    members = [FakeMember(f"u{i}") for i in range(5)]
    live(hub, "r", *members)
    outsider = FakeMember("x")
    live(hub, "other", outsider)
    assert hub.deliver_room("r", "1-0", b"hi") == 5
    assert all(m.written == [b"F[hi]"] for m in members)
    assert outsider.written == []


def test_deliver_room_to_an_unknown_room_delivers_nothing(hub: Hub) -> None:
    assert hub.deliver_room("nowhere", "1-0", b"hi") == 0


def test_leaving_stops_delivery_and_forgets_an_empty_room(hub: Hub) -> None:
    a, b = FakeMember("alice"), FakeMember("bob")
    live(hub, "r", a, b)
    assert hub.rooms == 1
    hub.leave("r", a)
    hub.deliver_room("r", "1-0", b"hi")
    assert a.written == [] and b.written == [b"F[hi]"]
    assert hub.members("r") == 1
    hub.leave("r", b)
    assert (hub.rooms, hub.members("r")) == (0, 0)
    hub.leave("r", b)  # twice is harmless
    assert hub.deliver_room("r", "2-0", b"again") == 0


def test_leaving_while_pending_discards_the_buffer_and_forgets_the_room(hub: Hub) -> None:
    m = FakeMember("alice")
    hub.add(m)
    hub.join("r", m)
    hub.deliver_room("r", "1-0", b"hi")
    hub.leave("r", m)
    assert hub.members("r") == 0
    assert hub.rooms == 0
    hub.deliver_room("r", "2-0", b"later")
    assert m.written == []


def test_one_member_in_two_rooms_gets_each_rooms_frames(hub: Hub) -> None:
    m = FakeMember("alice")
    live(hub, "a", m)
    hub.join("b", m)
    hub.activate("b", m, None)
    hub.deliver_room("a", "1-0", b"in-a")
    hub.deliver_room("b", "1-0", b"in-b")
    assert m.written == [b"F[in-a]", b"F[in-b]"]
    hub.leave("a", m)
    assert hub.rooms == 1


def test_a_member_leaving_during_fan_out_does_not_disturb_the_others(hub: Hub) -> None:
    """A write may close a slow consumer, which leaves its rooms while the fan-out iterates."""
    members = [FakeMember(f"u{i}") for i in range(4)]
    slow = members[1]
    slow.on_write = lambda _raw: hub.leave("r", slow)
    live(hub, "r", *members)
    assert hub.deliver_room("r", "1-0", b"hi") in (3, 4)
    assert all(m.written == [b"F[hi]"] for m in members)
    hub.deliver_room("r", "2-0", b"next")
    assert slow.written == [b"F[hi]"]
    assert members[3].written == [b"F[hi]", b"F[next]"]


# -- framing once per fan-out ----------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 10, 500])
def test_a_room_frame_is_framed_once_whatever_the_member_count(
        hub: Hub, framer: Framer, count: int) -> None:
    members = [FakeMember(f"u{i}") for i in range(count)]
    live(hub, "r", *members)
    hub.add(pending := FakeMember("late"))
    hub.join("r", pending)
    framer.calls = 0
    assert hub.deliver_room("r", "1-0", b"hi") == count
    assert framer.calls == 1
    first = members[0].written[0]
    assert all(m.written[0] is first for m in members)  # the same bytes object, not copies


@pytest.mark.parametrize("count", [1, 3, 20])
def test_a_user_frame_is_framed_once_whatever_the_connection_count(
        hub: Hub, framer: Framer, count: int) -> None:
    conns = [FakeMember("alice") for _ in range(count)]
    for c in conns:
        hub.add(c)
    framer.calls = 0
    assert hub.deliver_user("alice", b"dm") == count
    assert framer.calls == 1
    assert all(c.written == [b"F[dm]"] for c in conns)


def test_deliver_user_skips_the_origin_connection(hub: Hub, framer: Framer) -> None:
    a1, a2, a3 = FakeMember("alice"), FakeMember("alice"), FakeMember("alice")
    bob = FakeMember("bob")
    for m in (a1, a2, a3, bob):
        hub.add(m)
    assert hub.deliver_user("alice", b"dm", exclude=a2.conn_id) == 2
    assert (a1.written, a2.written, a3.written, bob.written) == ([b"F[dm]"], [], [b"F[dm]"], [])
    assert framer.calls == 1


def test_deliver_user_excluding_a_connection_of_someone_else_reaches_all(hub: Hub) -> None:
    a1, a2 = FakeMember("alice"), FakeMember("alice")
    bob = FakeMember("bob")
    for m in (a1, a2, bob):
        hub.add(m)
    assert hub.deliver_user("alice", b"dm", exclude=bob.conn_id) == 2


def test_deliver_user_to_a_user_without_local_connections_delivers_nothing(
        hub: Hub, framer: Framer) -> None:
    assert hub.deliver_user("nobody", b"dm") == 0
    assert framer.calls == 0


def test_deliver_user_after_remove_skips_the_removed_connection(hub: Hub) -> None:
    a1, a2 = FakeMember("alice"), FakeMember("alice")
    hub.add(a1)
    hub.add(a2)
    hub.remove(a1)
    assert hub.deliver_user("alice", b"dm") == 1
    assert a1.written == []


# -- matching control events -----------------------------------------------------------------

T = 1_800_000_000.0
A1 = FakeMember("alice", sid="s1", jti="ja1", iat=T - 100, conn_id="n/a1")
A2 = FakeMember("alice", sid="s1", jti="ja2", iat=T, conn_id="n/a2")
A3 = FakeMember("alice", sid="s2", jti="ja3", iat=T + 100, conn_id="n/a3")
A4 = FakeMember("alice", sid=None, jti="ja4", iat=T - 50, conn_id="n/a4")
B1 = FakeMember("bob", sid="s3", jti="jb1", iat=T - 100, conn_id="n/b1")
B2 = FakeMember("bob", sid="s1", jti="ja1", iat=T + 100, conn_id="n/b2")  # same sid/jti strings
EVERYONE = (A1, A2, A3, A4, B1, B2)


def close(**fields: object) -> CloseMatching:
    return CloseMatching(4410, "revoked", **fields)  # type: ignore[arg-type]


@pytest.fixture
def crowd(hub: Hub) -> Hub:
    for m in EVERYONE:
        hub.add(m)
    return hub


@pytest.mark.parametrize("event,expected", [
    (close(), EVERYONE),
    (close(user="alice"), (A1, A2, A3, A4)),
    (close(user="carol"), ()),
    (close(sid="s1"), (A1, A2, B2)),
    (close(user="alice", sid="s1"), (A1, A2)),
    (close(jti="ja1"), (A1, B2)),
    (close(user="alice", jti="ja1"), (A1,)),
    (close(user="alice", issued_before=T), (A1, A4)),  # strictly before
    (close(issued_before=T + 100), (A1, A2, A4, B1)),
    (close(user="alice", except_sid="s1"), (A3, A4)),
    (close(except_sid="s1"), (A3, A4, B1)),
    (close(user="alice", except_conn="n/a2"), (A1, A3, A4)),
    (close(user="alice", sid="s1", except_conn="n/a1"), (A2,)),
    (close(user="alice", issued_before=T + 1, except_sid="s1"), (A4,)),
    (close(user="bob", sid="s1", jti="ja1", issued_before=T + 101), (B2,)),
    (close(user="bob", sid="s1", jti="ja1", issued_before=T + 100), ()),
    (close(sid="s1", jti="ja2", except_conn="n/a2"), ()),
    (close(user="alice", sid="s2", except_sid="s2"), ()),
])
def test_matching_selects_the_connections_every_set_field_matches(
        crowd: Hub, event: CloseMatching, expected: tuple[FakeMember, ...]) -> None:
    got = list(crowd.matching(event))
    assert sorted(m.conn_id for m in got) == sorted(m.conn_id for m in expected)
    assert len(got) == len(set(map(id, got)))  # each connection once


FIELDS: dict[str, list[object]] = {
    "user": ["alice", "bob"],
    "sid": ["s1", "s2"],
    "jti": ["ja1", "jb1"],
    "issued_before": [T, T + 100.5],
    "except_sid": ["s1"],
    "except_conn": ["n/a1"],
}


def _matches(m: FakeMember, event: CloseMatching) -> bool:
    """The CloseMatching docstring, word for word: every field that is set matches."""
    return ((event.user is None or m.user == event.user)
            and (event.sid is None or m.sid == event.sid)
            and (event.jti is None or m.jti == event.jti)
            and (event.issued_before is None or m.iat < event.issued_before)
            and (event.except_sid is None or m.sid != event.except_sid)
            and (event.except_conn is None or m.conn_id != event.except_conn))


def test_matching_follows_the_contract_for_every_combination_of_fields(crowd: Hub) -> None:
    names = list(FIELDS)
    checked = 0
    for r in range(len(names) + 1):
        for combo in itertools.combinations(names, r):
            for values in itertools.product(*(FIELDS[n] for n in combo)):
                event = close(**dict(zip(combo, values, strict=True)))
                got = sorted(m.conn_id for m in crowd.matching(event))
                want = sorted(m.conn_id for m in EVERYONE if _matches(m, event))
                assert got == want, event
                checked += 1
    assert checked == 3 ** 4 * 2 * 2  # every field absent or each of its values


def test_matching_sees_no_removed_connection(crowd: Hub) -> None:
    crowd.remove(A1)
    assert A1 not in list(crowd.matching(close(user="alice")))
    assert A1 not in list(crowd.matching(close()))


# -- the real framer -------------------------------------------------------------------------


@pytest.mark.parametrize("size,header", [
    (0, b"\x81\x00"),
    (5, b"\x81\x05"),
    (125, b"\x81\x7d"),
    (126, b"\x81\x7e" + struct.pack("!H", 126)),
    (65535, b"\x81\x7e" + struct.pack("!H", 65535)),
    (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
])
def test_text_frame_is_one_final_unmasked_text_frame(size: int, header: bytes) -> None:
    """RFC 6455 5.2: FIN + opcode 1, no mask bit (server to client), the three length forms."""
    payload = b"x" * size
    assert text_frame(payload) == header + payload


def test_text_frame_carries_utf8_json_unchanged() -> None:
    payload = '{"type":"message","text":"é😀"}'.encode()
    assert text_frame(payload)[2:] == payload
