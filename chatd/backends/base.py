"""The backend interfaces: broker, presence and state, with their semantics.

Two implementations exist: ``memory`` (the embedded single-node default) and ``redis`` (a cluster
of nodes sharing one Redis). Both pass the one contract suite in ``tests/backends/``. A backend
never sees sessions, sockets or the hub: what it receives from other nodes flows up through the
:class:`FeedHandler` that ``server.py`` registers with :meth:`Broker.start`.

Every coroutine here may raise :class:`chatd.errors.BackendUnavailable` (and nothing foreign):
the command was then **not** carried out.

Message frames travel as bytes, encoded once by the publishing backend
(:func:`chatd.protocol.message_frame`), so a node forwards what it receives without re-encoding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable


def room_stream(room: str) -> str:
    """History stream name of a room."""
    return f"r:{room}"


def dm_stream(a: str, b: str) -> str:
    """History stream name of the conversation between two users (order does not matter)."""
    lo, hi = sorted((a, b))
    return f"d:{lo}|{hi}"


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as retained in history: its id (``"<ms>-<seq>"``) and its encoded frame."""

    id: str
    frame: bytes


@dataclass(frozen=True, slots=True)
class CloseMatching:
    """A control event: close every local connection that matches, on every node.

    A connection matches when every field that is set matches it: ``user`` its user,
    ``sid`` its session, ``jti`` its access token id, ``issued_before`` its token's ``iat`` being
    earlier (unix seconds), and it is not of session ``except_sid`` nor connection ``except_conn``.
    """

    code: int
    reason: str
    user: str | None = None
    sid: str | None = None
    jti: str | None = None
    issued_before: float | None = None
    except_sid: str | None = None
    except_conn: str | None = None


@dataclass(frozen=True, slots=True)
class RoomChange:
    """A control event: ``user``'s standing in ``room`` changed (contract section 9).

    ``reason`` ``removed`` / ``banned`` / ``deleted``: each of the user's local connections in
    the room (every connection in it when ``user`` is ``""``) loses it (``left`` with that
    reason) and receives nothing more from it. ``reason`` ``""``: the standing changed otherwise
    (mute, unmute, role); connections that keep a copy of it read it again.
    """

    room: str
    user: str
    reason: str = ""


@runtime_checkable
class RoomChangeHandler(Protocol):
    """A :class:`FeedHandler` that also takes room changes (brokers test for it at start)."""

    def room_change(self, change: RoomChange) -> None:
        """Apply a room change to the local connections; quick, no awaiting."""


class FeedHandler(Protocol):
    """What a node receives from the backend; implemented by the server shell.

    Called on the event loop, never concurrently; each call must be quick (no awaiting).
    """

    def room_frame(self, room: str, msg_id: str | None, frame: bytes) -> None:
        """A frame for every local member of ``room`` (a message, with its id, or presence)."""

    def user_frame(self, user: str, msg_id: str, frame: bytes, origin: str) -> None:
        """A direct-message frame for every local connection of ``user`` but ``origin``."""

    def control(self, event: CloseMatching) -> None:
        """Close the local connections the event matches."""

    def feed_lost(self, rooms: frozenset[str]) -> None:
        """The feed was interrupted; frames of these rooms (and DMs) may have been missed.

        The server tells the affected clients to resume (close 4004).
        """


class Broker(ABC):
    """Fan-out between nodes plus retained history, ids assigned atomically with publication.

    Ordering: for one stream, ids are strictly increasing and every node receives the frames of a
    room in id order. ``subscribe_room`` / ``release_room`` are reference-counted per node (one
    call pair per local connection); the node stays subscribed while the count is above zero and
    may unsubscribe lazily after it drops to zero.
    """

    @abstractmethod
    async def start(self, handler: FeedHandler) -> None:
        """Connect and start delivering to ``handler``; must not fail when the backend is down."""

    @abstractmethod
    async def close(self) -> None:
        """Stop delivering and release every resource."""

    @abstractmethod
    def healthy(self) -> bool:
        """True while commands and the feed work (``/readyz``)."""

    @abstractmethod
    async def subscribe_room(self, room: str) -> None:
        """Take one reference on ``room``; returns once frames of ``room`` reach the handler."""

    @abstractmethod
    def release_room(self, room: str) -> None:
        """Drop one reference taken by :meth:`subscribe_room` (never raises)."""

    @abstractmethod
    async def subscribe_user(self, user: str) -> None:
        """Take one reference on the user's direct-message channel."""

    @abstractmethod
    def release_user(self, user: str) -> None:
        """Drop one reference taken by :meth:`subscribe_user` (never raises)."""

    @abstractmethod
    async def publish_room(self, room: str, sender: str, text: str) -> StoredMessage:
        """Append a message to the room's history and publish it, in one atomic step."""

    @abstractmethod
    async def publish_direct(self, sender: str, to: str, text: str, origin: str) -> StoredMessage:
        """Append to the pair's conversation and deliver to both users' channels.

        ``origin`` identifies the sending connection, which receives an ``ack`` instead.
        """

    @abstractmethod
    async def publish_room_frame(self, room: str, frame: bytes) -> None:
        """Publish a frame that is not retained (presence) to every node with ``room`` members."""

    @abstractmethod
    async def publish_control(self, event: CloseMatching) -> None:
        """Deliver a control event to every node (this one included) within a second."""

    @abstractmethod
    async def publish_room_change(self, change: RoomChange) -> None:
        """Deliver a room change to every node (this one included) within a second.

        Nodes whose handler is a :class:`RoomChangeHandler` get it; others ignore it.
        """

    @abstractmethod
    async def recent(self, stream: str, limit: int) -> list[StoredMessage]:
        """The last ``limit`` retained messages of ``stream``, oldest first."""

    @abstractmethod
    async def history(
        self, stream: str, *, before: str | None, since: str | None, limit: int
    ) -> list[StoredMessage]:
        """Retained messages with ``since < id < before``, oldest first.

        With ``before`` (or neither bound) the newest ``limit`` of them; with only ``since`` the
        oldest ``limit`` after it.
        """

    @abstractmethod
    async def replay(self, stream: str, since: str, limit: int) -> tuple[list[StoredMessage], bool]:
        """Messages after ``since`` (at most ``limit``), and whether nothing was lost.

        The flag is True only when the backend can prove the gap is complete: ``since`` lies within
        the retained range (not trimmed away, not from a lost stream) and no more than ``limit``
        messages follow it.
        """


class Presence(ABC):
    """Who is in which room, cluster-wide, with a heartbeat TTL for nodes that die.

    ``join`` / ``leave`` are reference-counted per node (one pair per local connection). The
    implementation publishes ``presence`` frames to the room (through its broker) when a user
    becomes present in a room anywhere in the cluster, and when the user is gone from it
    everywhere (by ``leave`` or, for a dead node, by TTL expiry).
    """

    @abstractmethod
    async def join(self, room: str, user: str) -> None:
        """One more local connection of ``user`` is in ``room``."""

    @abstractmethod
    async def leave(self, room: str, user: str) -> None:
        """One local connection of ``user`` left ``room`` (never raises)."""

    @abstractmethod
    async def members(self, room: str) -> list[str]:
        """Users present in ``room`` on any live node, sorted."""

    @abstractmethod
    async def drain(self) -> None:
        """Remove every entry of this node now (graceful shutdown) instead of waiting for TTL."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    """An account; ``password_hash`` is None for users that only ever log in with external JWTs."""

    name: str
    password_hash: str | None = None
    disabled: bool = False
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A login session: the refresh token chain of one device.

    Only hashes of refresh tokens are stored. ``refresh_hash`` is the newest valid token;
    ``live`` holds the other valid ones (branches a retry inside the grace window forked: two
    browser tabs that shared one token each keep a working one), newest first. ``spent`` holds
    ``(hash, rotated_at)`` of tokens rotated away, newest first and bounded
    (:data:`chatd.backends.sessions.MAX_SPENT`): presenting one of those is reuse; presenting
    anything else is merely an invalid token (see :func:`chatd.backends.sessions.rotate`).
    """

    sid: str
    user: str
    device: str
    created_at: float
    expires_at: float
    refresh_hash: str
    live: tuple[str, ...] = ()
    spent: tuple[tuple[str, float], ...] = ()
    rotated_at: float = 0.0
    refreshes_today: int = 0
    day: int = 0

    def valid(self, presented_hash: str) -> bool:
        """True when ``presented_hash`` is one of the session's working refresh tokens."""
        return presented_hash == self.refresh_hash or presented_hash in self.live


class RotateOutcome(Enum):
    """Result of :meth:`State.rotate_refresh`."""

    ROTATED = "rotated"
    REUSED = "reused"  # a token rotated away came back: the session must be revoked
    UNKNOWN = "unknown"  # no such session, it expired, or a hash it never issued (no effect)


class TokenVerdict(Enum):
    """Result of :meth:`State.token_verdict`."""

    OK = "ok"
    REVOKED = "revoked"
    DISABLED = "disabled"


@dataclass(slots=True)
class RefreshUpdate:
    """The new state written by a successful rotation."""

    new_hash: str
    rotated_at: float
    refreshes_today: int
    day: int
    extra: dict[str, str] = field(default_factory=dict)


class State(ABC):
    """Accounts, login sessions and revocations.

    Deny entries expire with the tokens they deny (``until``, unix seconds), so they never grow
    without bound.
    """

    @abstractmethod
    async def get_user(self, name: str) -> UserRecord | None: ...

    @abstractmethod
    async def put_user(self, record: UserRecord) -> None: ...

    @abstractmethod
    async def delete_user(self, name: str) -> bool: ...

    @abstractmethod
    async def list_users(self) -> list[UserRecord]: ...

    @abstractmethod
    async def note_seen(self, user: str) -> None:
        """Remember that ``user`` connected (any token), so DMs to them are not ``not_found``."""

    @abstractmethod
    async def user_known(self, user: str) -> bool:
        """True for an account or a user that has connected before."""

    @abstractmethod
    async def create_session(self, record: SessionRecord, limit: int = 0) -> list[str]:
        """Store a new session; with ``limit`` > 0, in the same atomic step delete the user's
        oldest sessions so that at most ``limit`` remain (the new one always stays).

        Returns:
            The ids of the sessions deleted to make room, so the caller can deny their tokens
            and close their sockets. Two concurrent logins with ``limit`` 1 leave exactly one.
        """

    @abstractmethod
    async def get_session(self, sid: str) -> SessionRecord | None: ...

    @abstractmethod
    async def user_sessions(self, user: str) -> list[SessionRecord]: ...

    @abstractmethod
    async def delete_session(self, sid: str) -> None: ...

    @abstractmethod
    async def rotate_refresh(
        self, sid: str, presented_hash: str, update: RefreshUpdate, grace: float
    ) -> RotateOutcome:
        """Atomically apply :func:`chatd.backends.sessions.rotate` to the session.

        A working token rotates; a spent one within ``grace`` seconds of its rotation forks a
        new branch (a lost response, or a second tab); a spent one later is ``REUSED``; a hash
        the session never issued is ``UNKNOWN`` and changes nothing.
        """

    @abstractmethod
    async def revoke_jti(self, jti: str, until: float, *, issuer: str | None = None,
                         user: str | None = None) -> None:
        """Refuse a token by ``jti`` until ``until``.

        With ``user`` (and ``issuer``, ``""`` for none) only the token of that issuer and
        subject is refused (:func:`chatd.backends.sessions.jti_key`): another issuer's token
        that reuses the ``jti`` is not. Without ``user`` (an admin's ``revoke_jti``, which
        names only the ``jti``) every token with that ``jti`` is refused.
        """

    @abstractmethod
    async def revoke_session(self, sid: str, until: float) -> None: ...

    @abstractmethod
    async def revoke_user_before(self, user: str, issued_before: float, until: float, *,
                                 skew: float = 0.0) -> None:
        """Refuse every token of ``user`` issued before ``issued_before``, until ``until``.

        A token counts as issued before when its ``iat`` is below ``issued_before + skew``
        (``skew`` is the verifier's leeway: an issuer whose clock runs ahead stamps ``iat`` up
        to that far in the future), unless it carries the ``sid`` of a live session of
        ``user`` created at or after ``issued_before`` (chatd's own tokens minted after the
        revocation: every older session was ended by it). Marks widen, never narrow.
        """

    @abstractmethod
    async def set_disabled(self, user: str, disabled: bool) -> bool:
        """Disable or enable; returns False for an unknown user."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Write what is pending and release resources (a node calls it once, at shutdown)."""

    @abstractmethod
    async def token_verdict(
        self, user: str, jti: str, sid: str | None, iat: float, issuer: str = ""
    ) -> TokenVerdict:
        """Whether an otherwise valid access token may be used (one look-up, two when a user
        mark exists and the token names a session)."""


@dataclass(frozen=True, slots=True)
class RoomStanding:
    """One user's standing in one room, read in one look-up (contract section 9).

    ``exists``: the room was created (``members`` rooms exist only then). ``role``: on the
    member list with that role (``owner``, ``moderator``, ``member``). ``banned_until`` and
    ``muted_until``: unix seconds, ``inf`` until lifted, None when not (or no longer) in force.
    """

    exists: bool = False
    role: str | None = None
    banned_until: float | None = None
    muted_until: float | None = None


@dataclass(frozen=True, slots=True)
class RoomMember:
    """One entry of a room's member list."""

    user: str
    role: str


@dataclass(frozen=True, slots=True)
class RoomInfo:
    """A created room: its name, when and by whom (None: by an operator or the HTTP API)."""

    name: str
    created_at: float
    owner: str | None = None


class RoomStore(ABC):
    """Created rooms, member lists with roles, bans and mutes, shared by every node.

    Roles, bans and mutes may exist for rooms that were never created (an ``open`` room can have
    moderators). Bans and mutes carry ``until`` and end by themselves: an expired one is never
    returned. Decisions on them are :mod:`chatd.core.rooms`'s; this only stores.
    """

    @abstractmethod
    async def create(self, room: str, owner: str | None) -> bool:
        """Create ``room`` with ``owner`` (when given) as its owner; False if it exists."""

    @abstractmethod
    async def delete(self, room: str) -> bool:
        """Forget the room, its member list, bans and mutes; False if it was not created."""

    @abstractmethod
    async def info(self, room: str) -> RoomInfo | None: ...

    @abstractmethod
    async def list_rooms(self, after: str | None, limit: int) -> list[RoomInfo]:
        """Created rooms named after ``after``, in name order, at most ``limit``."""

    @abstractmethod
    async def standing(self, room: str, user: str) -> RoomStanding: ...

    @abstractmethod
    async def set_role(self, room: str, user: str, role: str) -> None:
        """Put ``user`` on the member list with ``role`` (replacing their role)."""

    @abstractmethod
    async def remove_member(self, room: str, user: str) -> bool:
        """Take ``user`` off the member list; False if they were not on it."""

    @abstractmethod
    async def members(self, room: str, after: str | None, limit: int) -> list[RoomMember]:
        """The member list in user-name order, names after ``after``, at most ``limit``."""

    @abstractmethod
    async def restrict(self, room: str, user: str, kind: str, until: float) -> None:
        """Ban (``kind`` ``"ban"``) or mute (``"mute"``) ``user`` until ``until`` (may be inf)."""

    @abstractmethod
    async def lift(self, room: str, user: str, kind: str) -> bool:
        """End a ban or mute; False if none was in force."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release resources (a node calls it once, at shutdown)."""


@dataclass(slots=True)
class Backend:
    """The parts of one backend, started and closed together."""

    broker: Broker
    presence: Presence
    state: State
    rooms: RoomStore
