"""Property-based fuzzing (hypothesis) of the frame parser, the session state machine and a node.

Three layers, each with an explicit example count so every CI run tries thousands of inputs:

- the parser (:func:`chatd.protocol.decode` + :func:`chatd.protocol.parse`): any byte string,
  text (lone surrogates included) or JSON value (nested, huge integers, NaN and Infinity
  literals, duplicate keys) is a checked :class:`~chatd.protocol.Command` or ``bad_request``;
- the session (:class:`chatd.session.Session`) as a hypothesis state machine, with a model of
  what the contract says must happen: bad-frame and rate-limit budgets close with exactly 4400
  and 4029 at the right frame, first frames close with 4401, binary frames with 1003, and a
  valid command afterwards always does what it should;
- a real node over a socket: random frames from a hostile connection, with a bystander that
  stays connected throughout and must keep getting answers, and every frame answered or the
  connection closed with a contract code.

"Never another exception": anything other than CommandError / CloseConnection escapes the
``try`` blocks below and fails the test with hypothesis's minimal example.

CI runs 3000 + 1000 + 200 examples (about 25 s on two cores). The long run multiplies them:
``CHATD_FUZZ_SCALE=50 .venv/bin/pytest -q -p no:cacheprovider tests/test_fuzz.py``.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from websockets.exceptions import ConnectionClosed

from chatd import protocol
from chatd.auth.tokens import Claims
from chatd.codes import CloseCode, ErrorCode
from chatd.config import LimitsConfig
from chatd.errors import CloseConnection, CommandError
from chatd.server import Node
from tests.client import Client
from tests.conftest import NodeFactory
from tests.nodes import issue

#: Multiplies every example count below (the long run of docs/reliability.md).
SCALE = max(1, int(os.environ.get("CHATD_FUZZ_SCALE", "1")))

# -- strategies --------------------------------------------------------------------------------

TYPES = ["join", "leave", "send", "history", "who", "ping", "auth", "refresh", "login",
         "logout", "admin"]
KEYS = ["type", "room", "to", "with", "text", "since", "before", "limit", "token",
        "refresh_token", "username", "password", "device", "all", "op", "user", "jti", "exp",
        "ref"]

#: Text from every Unicode category, lone surrogates (Cs) included.
any_text = st.text(alphabet=st.characters(codec=None, categories=None), max_size=40) | st.text(
    alphabet=st.characters(categories=["Cs", "Cc", "Zs", "Mn", "So", "Lo"]), max_size=20)
huge_ints = st.integers() | st.integers(min_value=2**63 - 5, max_value=2**63 + 5) | \
    st.integers(min_value=10**30, max_value=10**400).map(lambda n: n * (-1) ** (n % 2))
json_scalars = (st.none() | st.booleans() | huge_ints
                | st.floats(allow_nan=True, allow_infinity=True) | any_text)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(any_text | st.sampled_from(KEYS),
                                                              kids, max_size=4),
    max_leaves=8,
)

# Values that pass field validation, so fuzzing also reaches the later checks (built from
# alphabets rather than from_regex: cheaper to draw, and the parser test keeps its budget).
_ALNUM = "abcXYZ019"
valid_rooms = st.builds(lambda a, b: a + b, st.sampled_from(_ALNUM),
                        st.text(alphabet=_ALNUM + "_.:-", max_size=6)) | st.sampled_from(
    ["general", "g", "x" * 64])
#: Mostly the same two rooms, so that joins, sends, whos and leaves meet each other.
room_names = st.one_of(st.sampled_from(["general", "g"]), st.sampled_from(["general", "g"]),
                       valid_rooms, st.sampled_from(["x" * 65, "-bad", "a b", "é"]))
user_names = st.builds(lambda a, b: a + b, st.sampled_from(_ALNUM),
                       st.text(alphabet=_ALNUM + "_.-", max_size=6)) | st.sampled_from(
    ["alice", "bob", "u:colon", "x" * 65])
msg_ids = st.builds(lambda ms, seq: f"{ms}-{seq}", st.integers(0, 10**16), st.integers(0, 10**16))
refs = st.text(min_size=1, max_size=64) | st.text(min_size=65, max_size=70) | st.just("")
plausible = {
    "room": room_names, "to": user_names, "with": user_names, "user": user_names,
    "text": st.text(min_size=1, max_size=30) | st.sampled_from(["", "x" * 4001]),
    "since": msg_ids, "before": msg_ids,
    "limit": st.integers(-5, 120), "all": st.booleans(), "op": st.sampled_from(
        [*protocol.ADMIN_OPS, "nuke"]), "ref": refs, "exp": st.floats() | huge_ints,
}


#: The fields each command reads (contract section 3), so most drawn commands are nearly valid.
FIELDS = {
    "join": ["room", "since"], "leave": ["room"], "who": ["room"], "ping": [],
    "send": ["text"], "history": ["before", "since", "limit"],
    "auth": ["token"], "refresh": ["refresh_token"], "login": ["username", "password", "device"],
    "logout": ["all"], "admin": ["op", "user", "jti", "exp"],
}
secrets = st.text(min_size=1, max_size=40)


@st.composite
def commandish(draw: st.DrawFn, types: tuple[str, ...] = tuple(TYPES)) -> dict[str, Any]:
    """A JSON object shaped like a command: usually a known type with its own fields, each
    plausible, wild (any JSON value) or missing; sometimes extra keys or an odd type."""
    kind = draw(st.sampled_from(types))
    obj: dict[str, Any] = {"type": kind if draw(st.integers(0, 9)) else draw(json_values)}
    fields = list(FIELDS.get(kind, []))
    if kind in ("send", "history"):  # a room or a user, rarely both or neither
        other = "to" if kind == "send" else "with"
        fields += draw(st.sampled_from([["room"], ["room"], [other], ["room", other], []]))
    for key in [*fields, *draw(st.lists(st.sampled_from(KEYS[1:]), max_size=2))]:
        how = draw(st.integers(0, 9))
        if how < 6:
            obj[key] = draw(plausible.get(key, secrets))
        elif how < 8:
            obj[key] = draw(json_values)
    if draw(st.booleans()):
        obj["ref"] = draw(refs)
    return obj


def encode(value: Any, ascii_only: bool) -> str:
    """JSON text the stdlib way: keeps huge ints, writes NaN/Infinity, lone surrogates as-is."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)


texts_of_json = st.builds(encode, json_values | commandish(), st.booleans())
raw_texts = any_text | st.sampled_from([
    "", " ", "{", "}", "[]", "null", "NaN", "1e400", "-0", '"\\ud800"', "{" * 2000 + "}" * 2000,
    '{"type":"ping","type":"join"}', '{"type":"ping"}\x00', "\ufeff{\"type\":\"ping\"}",
])
#: One frame as the session sees it: text (str) or binary (bytes).
frames = st.one_of(texts_of_json, texts_of_json, texts_of_json, raw_texts,
                   st.binary(max_size=64) | texts_of_json.map(
                       lambda t: t.encode("utf-8", "surrogatepass")))

CLOSE_CODES = {CloseCode.UNSUPPORTED_DATA, CloseCode.PROTOCOL_VIOLATION, CloseCode.RATE_ABUSED,
               CloseCode.BAD_CREDENTIAL, CloseCode.NORMAL}


def check_command(cmd: protocol.Command) -> None:
    """What a returned command promises its handler: every field already valid."""
    assert cmd.type in TYPES
    assert cmd.ref is None or (isinstance(cmd.ref, str) and 1 <= len(cmd.ref) <= 64)
    args = cmd.args
    for key in ("room",):
        if key in args:
            assert protocol.ROOM_RE.match(args[key])
    for key in ("to", "with", "user"):
        if key in args:
            assert protocol.USER_RE.match(args[key])
    for key in ("since", "before"):
        if args.get(key) is not None:
            assert protocol.MSG_ID_RE.match(args[key])
    if cmd.type == "send":
        assert isinstance(args["text"], str) and 1 <= len(args["text"]) <= 4000
        assert ("room" in args) != ("to" in args)
    if cmd.type == "history":
        assert 1 <= args["limit"] <= protocol.MAX_HISTORY_LIMIT
    if cmd.type == "admin" and args["op"] == "revoke_jti" and args["exp"] is not None:
        assert isinstance(args["exp"], int | float) and not isinstance(args["exp"], bool)


# -- the parser --------------------------------------------------------------------------------


@settings(max_examples=3000 * SCALE, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=frames)
def test_any_frame_is_a_checked_command_or_a_bad_request(data: str | bytes) -> None:
    try:
        obj = protocol.decode(data)
    except CommandError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
        return
    assert isinstance(obj, dict)
    try:
        cmd = protocol.parse(obj, max_text_chars=4000)
    except CommandError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
        assert len(exc.message) < 200  # never echoes a huge value back
        return
    check_command(cmd)
    assert protocol.ref_of(obj) == cmd.ref


# -- the session state machine -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


LIMITS = LimitsConfig(rate=5.0, burst=4, max_bad_frames=4, max_rate_limited=3,
                      max_rooms_per_connection=3, max_text_chars=4000)
USER = Claims(sub="alice", jti="j1", iat=1_800_000_000.0, exp=1_800_000_900.0)
ADMIN = Claims(sub="root", jti="j2", iat=1_800_000_000.0, exp=1_800_000_900.0, role="admin")


def parsed(data: str | bytes) -> tuple[dict[str, Any] | None, protocol.Command | None]:
    """What the parser alone makes of a frame: (object or None, command or None)."""
    try:
        obj = protocol.decode(data)
    except CommandError:
        return None, None
    try:
        return obj, protocol.parse(obj, max_text_chars=LIMITS.max_text_chars)
    except CommandError:
        return obj, None


class SessionMachine(RuleBasedStateMachine):
    """Drive one :class:`Session` the way ``server.py`` does, against a model of the contract.

    The model keeps the consecutive bad-frame and rate-limited counts the contract defines and
    the rooms the shell has joined; every frame's outcome is checked against it.
    """

    def __init__(self) -> None:
        super().__init__()
        from chatd.session import Session

        self.clock = Clock()
        self.session = Session(LIMITS, self.clock)
        self.phase = "awaiting"
        self.claims = USER
        self.bad = 0
        self.limited = 0

    # -- the shell's side -----------------------------------------------------------------

    def closed(self, exc: CloseConnection) -> None:
        event(f"close {int(exc.code)}")  # coverage, shown by --hypothesis-show-statistics
        assert exc.code in CLOSE_CODES, exc.code
        assert exc.reason and len(exc.reason.encode()) <= 123  # fits a close frame
        self.session.closed()
        self.phase = "closed"

    def carry_out(self, cmd: protocol.Command) -> None:
        """What the command handlers report back to the session."""
        if cmd.type == "join":
            self.session.joined(cmd.args["room"])
        elif cmd.type == "leave":
            self.session.left(cmd.args["room"])
        elif cmd.type == "logout":
            self.session.closed()
            self.phase = "closed"

    # -- rules ----------------------------------------------------------------------------

    @precondition(lambda self: self.phase == "awaiting")
    @rule(data=frames, admin=st.booleans())
    def first_frame(self, data: str | bytes, admin: bool) -> None:
        _, expected = parsed(data) if isinstance(data, str) else (None, None)
        try:
            cmd = self.session.receive(data)
        except CloseConnection as exc:
            self.closed(exc)
            if isinstance(data, bytes):
                assert exc.code == CloseCode.UNSUPPORTED_DATA
            else:
                assert exc.code == CloseCode.BAD_CREDENTIAL
                assert expected is None or expected.type not in protocol.AUTH_TYPES
            return
        assert expected is not None and expected.type in protocol.AUTH_TYPES
        assert cmd.type == expected.type
        self.claims = ADMIN if admin else USER
        self.session.authenticated(self.claims)
        self.phase = "ready"

    @precondition(lambda self: self.phase == "awaiting")
    @rule(data=st.builds(encode, commandish(tuple(protocol.AUTH_TYPES)), st.booleans()),
          admin=st.booleans())
    def auth_shaped_first_frame(self, data: str, admin: bool) -> None:
        self.first_frame(data, admin)

    @precondition(lambda self: self.phase == "awaiting")
    @rule()
    def authenticate_by_handshake(self) -> None:
        self.session.authenticated(USER)
        self.phase = "ready"

    @precondition(lambda self: self.phase == "ready")
    @rule(data=frames)
    def any_frame(self, data: str | bytes) -> None:
        self.frame(data)

    @precondition(lambda self: self.phase == "ready")
    @rule(data=st.builds(encode, commandish(), st.booleans()))
    def command_shaped_frame(self, data: str) -> None:
        self.frame(data)

    @precondition(lambda self: self.phase == "ready")
    @rule(n=st.integers(1, 10), data=st.sampled_from(['{"type":"ping"}', '{"type":"who"}', "{}"]))
    def flood(self, n: int, data: str) -> None:
        """Frames faster than the rate: rate_limited, then 4029 (or 4400 for bad ones)."""
        for _ in range(n):
            if self.phase != "ready":
                return
            self.frame(data)

    @precondition(lambda self: self.phase == "ready")
    @rule(seconds=st.sampled_from([0.0, 0.01, 0.1, 0.5, 2.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @precondition(lambda self: self.phase == "ready")
    @rule(room=st.sampled_from(["general", "g"]) | valid_rooms)
    def a_valid_join_then_send_behaves(self, room: str) -> None:
        """After anything at all, valid commands do exactly what they should."""
        self.refill()
        rooms = set(self.session.rooms)
        try:
            cmd = self.session.receive(orjson.dumps({"type": "join", "room": room,
                                                      "ref": "j"}).decode())
        except CommandError as exc:
            assert exc.code is ErrorCode.TOO_MANY_ROOMS
            assert room not in rooms and len(rooms) >= LIMITS.max_rooms_per_connection
            assert exc.ref == "j"
            self.bad = self.limited = 0
            return
        assert (cmd.type, cmd.ref, cmd.args["room"]) == ("join", "j", room)
        self.carry_out(cmd)
        sent = self.session.receive(orjson.dumps({"type": "send", "room": room,
                                                  "text": "hi"}).decode())
        assert (sent.type, sent.args) == ("send", {"room": room, "text": "hi"})
        self.bad = self.limited = 0

    @precondition(lambda self: self.phase == "ready")
    @rule()
    def a_valid_ping_is_answered(self) -> None:
        self.refill()
        cmd = self.session.receive('{"type":"ping","ref":"p"}')
        assert (cmd.type, cmd.ref) == ("ping", "p")
        self.bad = self.limited = 0

    @precondition(lambda self: self.phase == "closed")
    @rule(data=frames)
    def nothing_runs_once_closed_and_the_client_reconnects(self, data: str | bytes) -> None:
        try:
            self.session.receive(data)
        except CloseConnection:
            self.__init__()  # type: ignore[misc]  # a new connection, a new session
            return
        raise AssertionError("a closed session accepted a frame")

    # -- the model --------------------------------------------------------------------------

    def refill(self) -> None:
        self.clock.now += LIMITS.burst / LIMITS.rate + 1

    def frame(self, data: str | bytes) -> None:
        obj, expected = parsed(data) if isinstance(data, str) else (None, None)
        rooms = set(self.session.rooms)
        try:
            cmd = self.session.receive(data)
        except CloseConnection as exc:
            if isinstance(data, bytes):
                assert exc.code == CloseCode.UNSUPPORTED_DATA
            elif exc.code == CloseCode.PROTOCOL_VIOLATION:
                assert expected is None and self.bad + 1 == LIMITS.max_bad_frames
            else:
                assert exc.code == CloseCode.RATE_ABUSED, exc.code
                assert obj is not None and self.limited + 1 == LIMITS.max_rate_limited
            self.closed(exc)
            return
        except CommandError as exc:
            event(f"error {exc.code}")
            assert exc.ref == (protocol.ref_of(obj) if obj is not None else None)
            if exc.code is ErrorCode.RATE_LIMITED:
                assert obj is not None
                self.limited += 1
                assert self.limited < LIMITS.max_rate_limited
                return
            if obj is not None:
                self.limited = 0
            if expected is None:
                assert exc.code is ErrorCode.BAD_REQUEST
                self.bad += 1
                assert self.bad < LIMITS.max_bad_frames
                return
            self.bad = 0
            kind, args = expected.type, expected.args
            if exc.code is ErrorCode.NOT_JOINED:
                assert kind in ("send", "who", "history") and args["room"] not in rooms
            elif exc.code is ErrorCode.TOO_MANY_ROOMS:
                assert kind == "join" and len(rooms) >= LIMITS.max_rooms_per_connection
            elif exc.code is ErrorCode.FORBIDDEN:
                assert kind == "admin" and not self.claims.is_admin
            else:
                assert (exc.code, kind) == (ErrorCode.BAD_REQUEST, "login"), exc.code
            return
        event(f"command {cmd.type}")
        assert expected is not None and cmd == expected
        check_command(cmd)
        self.bad = self.limited = 0
        if cmd.type in ("send", "who", "history") and "room" in cmd.args:
            assert cmd.args["room"] in rooms
        assert cmd.type != "login"
        assert cmd.type != "admin" or self.claims.is_admin
        self.carry_out(cmd)

    @invariant()
    def limits_hold(self) -> None:
        assert len(self.session.rooms) <= LIMITS.max_rooms_per_connection
        assert self.session.bad_frames == self.bad or self.phase == "closed"
        assert self.session.rate_limited == self.limited or self.phase == "closed"


SessionMachine.TestCase.settings = settings(
    max_examples=1000 * SCALE, stateful_step_count=12, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_session_state_machine_answers_every_frame_by_the_contract = SessionMachine.TestCase


# -- a real node over a socket -------------------------------------------------------------

#: Close codes a hostile connection may get here: contract codes only (1007 invalid UTF-8 and
#: the handshake-level refusals are the subject of tests/test_hostile_*.py).
SOCKET_CLOSE_CODES = {1000, 1003, 1009, 4029, 4400, 4401, 4403, 4410}
#: Frames that answer one command (``message`` and ``presence`` are events, not answers).
ANSWER_TYPES = {"joined", "left", "ack", "history", "who", "pong", "tokens", "error"}


def sendable(frame: str | bytes) -> bool:
    """A client library cannot put a lone surrogate in a text frame (it is not UTF-8)."""
    return isinstance(frame, bytes) or not any("\ud800" <= ch <= "\udfff" for ch in frame)


socket_frames = st.one_of(
    st.builds(encode, commandish(), st.just(False)),
    st.builds(encode, json_values, st.just(False)),
    st.text(max_size=40),
    st.binary(max_size=16),
).filter(sendable)


@pytest.fixture
async def fuzz_node(node_factory: NodeFactory) -> tuple[Node, Client]:
    """A node, and a bystander in room ``lobby`` that stays connected for every example."""
    node = await node_factory(limits={"rate": 100000, "burst": 100000})
    bystander = await Client.open(f"ws://127.0.0.1:{node.port}/ws?token={issue('bystander')}")
    assert (await bystander.recv())["type"] == "welcome"
    assert (await bystander.request("join", "joined", room="lobby"))["type"] == "joined"
    return node, bystander


_users = itertools.count()


@settings(max_examples=200 * SCALE, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(socket_frames, min_size=1, max_size=6), handshake=st.booleans())
async def test_random_frames_against_a_node_leave_it_healthy_and_a_bystander_served(
        fuzz_node: tuple[Node, Client], batch: list[str | bytes], handshake: bool) -> None:
    node, bystander = fuzz_node
    # A user of its own per example: a fuzzed "logout all" revokes every token of its user.
    user = f"fuzzer{next(_users)}"
    url = f"ws://127.0.0.1:{node.port}/ws"
    c = await Client.open(url + (f"?token={issue(user)}" if handshake else ""))
    try:
        if handshake:
            assert (await c.recv())["type"] == "welcome"
        else:
            await c.send(type="auth", token=issue(user))
            assert (await c.recv())["type"] == "welcome"
        code = await exchange(c, batch)
        assert code is None or code in SOCKET_CLOSE_CODES, (code, batch)
    finally:
        await c.close()
    # The bystander, connected throughout, still gets answers and its room's messages.
    assert (await bystander.request("ping", "pong"))["type"] == "pong"
    ack = await bystander.request("send", "ack", room="lobby", text="still here")
    assert ack["type"] == "ack", ack
    await bystander.expect("message", id=ack["id"])
    assert bystander.ws.close_code is None


async def exchange(c: Client, batch: list[str | bytes]) -> int | None:
    """Send ``batch``, then a ping: every frame must get its answer, or the socket a close.

    Returns:
        the close code when the server closed the connection, else None.
    """
    for data in batch:
        try:
            await c.send_raw(data)
        except ConnectionClosed:
            break
    try:
        await c.send(type="ping", ref="final-ping")
        await c.take(lambda f: f.get("ref") == "final-ping" and f.get("type") == "pong")
    except ConnectionClosed:
        code, _ = await c.closed()
        return code
    except TimeoutError:
        raise AssertionError(f"no answer to a ping after {batch!r}") from None
    answers = [f for f in c.frames if f.get("type") in ANSWER_TYPES]
    assert len(answers) == len(batch) + 1, (batch, c.frames)
    return None
