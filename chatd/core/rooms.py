"""Who may do what in a room (contract section 9): namespaces, access modes, roles, bans, mutes.

Plain calls, no I/O: the shell reads a user's :class:`~chatd.backends.base.RoomStanding` from the
backend (one look-up), hands it here with the namespace policy, the actor and the time, and gets
back :class:`Allowed` or a :class:`Refusal` (an error code and a message) to answer with.

Rules that are not spelt out by the contract, chosen here and documented in docs/protocol.md:

- **Rank.** admin > owner > moderator > member > none. A moderation command (add/remove member,
  ban, unban, mute, unmute) needs the rank the contract's table names *and* a target ranked
  strictly below the actor: a moderator cannot ban another moderator, an owner cannot remove
  another owner (an admin can), nobody acts on themselves. ``add_member`` may give only a role
  ranked below the actor's (owners add moderators, admins add owners).
- **Admins** act as owners everywhere, rank above them, and are never held by bans, mutes or
  member lists. A banned moderator can do nothing in the room: access is checked first.
- **Token rooms** are joined by the token (the ``rooms`` claim or a room token's grant) or by
  admins; the room's stored roles still decide who moderates. The member list gives no access
  there: the application that signs the tokens decides who gets in.
- **No probing.** A refusal for a room the actor may not see is the same text whether or not the
  room exists (``not a member of team:acme``). ``not_found`` for a room that does not exist goes
  only to someone who could have joined it: admins, and anyone in an ``allow_create`` namespace
  (where ``create`` answers ``conflict`` anyway, so existence is no secret there).
- Removing someone who is not on the list, unbanning someone who is not banned: ``ack``
  (idempotent, so a client may retry after ``unavailable``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chatd.backends.base import RoomStanding
from chatd.config import RoomNamespace

OPEN, MEMBERS, TOKEN = "open", "members", "token"
ACCESS_MODES = (OPEN, MEMBERS, TOKEN)
OWNER, MODERATOR, MEMBER = "owner", "moderator", "member"
ROLES = (OWNER, MODERATOR, MEMBER)
#: A ban or mute without a duration lasts until lifted.
FOREVER = math.inf
#: The longest ``duration`` a ban or mute may have (ten years, in seconds).
MAX_DURATION = 10 * 365 * 86400
#: ``limit`` bounds of the ``members`` command.
MAX_MEMBERS_LIMIT = 1000

FORBIDDEN, NOT_FOUND, CONFLICT = "forbidden", "not_found", "conflict"

#: An entry of the ``rooms`` claim: a room name, or a prefix of one followed by ``*``.
CLAIM_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}|[A-Za-z0-9_.:-]{0,63}\*)\Z")
ROOM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")

_RANK = {None: 0, MEMBER: 1, MODERATOR: 2, OWNER: 3}
_ADMIN_RANK = 4
#: The rank of a moderator: what deleting other people's messages needs.
MODERATOR_RANK = _RANK[MODERATOR]
_NAMES = {MEMBER: "a member", MODERATOR: "a moderator", OWNER: "an owner"}

#: Moderation commands checked by :func:`may_moderate`, with the rank each needs.
MODERATION = {
    "add_member": _RANK[MODERATOR],
    "remove_member": _RANK[MODERATOR],
    "ban": _RANK[MODERATOR],
    "unban": _RANK[MODERATOR],
    "mute": _RANK[MODERATOR],
    "unmute": _RANK[MODERATOR],
}
_VERBS = {"add_member": "add members to", "remove_member": "remove members from",
          "ban": "ban in", "unban": "unban in", "mute": "mute in", "unmute": "unmute in"}


def namespace_of(room: str) -> str:
    """The part of ``room`` before the first ``:`` (``""`` when there is none)."""
    head, sep, _ = room.partition(":")
    return head if sep else ""


DEFAULT_NAMESPACE = RoomNamespace()


class Policies:
    """The namespace policies of the configuration, looked up by room name.

    Unlisted namespaces are refused, except the default one, which is ``open`` when unlisted.
    A reload builds a new instance; the shell uses it for joins from then on.
    """

    def __init__(self, namespaces: Iterable[RoomNamespace] = ()) -> None:
        self._by_name = {ns.name: ns for ns in namespaces}
        self._by_name.setdefault("", DEFAULT_NAMESPACE)

    def for_room(self, room: str) -> RoomNamespace | None:
        """The policy of the room's namespace, or None when that namespace is not configured."""
        return self._by_name.get(namespace_of(room))


@dataclass(frozen=True, slots=True)
class Actor:
    """The user of a command: name, admin role and the access token's ``rooms`` claim."""

    user: str
    admin: bool = False
    claim: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Grant:
    """A verified room token held by a connection: the room, the role it gives, its expiry."""

    room: str
    role: str | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class Allowed:
    """Access granted; ``role`` is the effective one (None: a participant without a role).

    ``until`` is when the verdict must be made again (a room token expiring), else ``inf``.
    """

    role: str | None
    admin: bool = False
    until: float = math.inf

    @property
    def rank(self) -> int:
        return _ADMIN_RANK if self.admin else _RANK[self.role]


@dataclass(frozen=True, slots=True)
class Refusal:
    """An ``error`` frame to answer with: ``code`` and a message naming the reason."""

    code: str
    message: str


def claim_grants(claim: Sequence[str], room: str) -> bool:
    """True when the ``rooms`` claim names ``room`` or a prefix of it ending in ``*``."""
    for entry in claim:
        if entry.endswith("*"):
            if room.startswith(entry[:-1]):
                return True
        elif entry == room:
            return True
    return False


def valid_claim(value: object) -> tuple[str, ...] | None:
    """The ``rooms`` claim as a tuple, or None when it is not a list of names and patterns."""
    if not isinstance(value, list) or len(value) > 1000:
        return None
    if not all(isinstance(v, str) and CLAIM_RE.match(v) for v in value):
        return None
    return tuple(value)


def expiry(now: float, duration: int | None) -> float:
    """When a ban or mute of ``duration`` seconds from ``now`` ends (``inf``: never)."""
    return FOREVER if duration is None else now + duration


def describe_until(what: str, room: str, until: float) -> str:
    return f"{what} from {room}" if until == FOREVER else f"{what} until {math.ceil(until)}"


def _active(until: float | None, now: float) -> bool:
    return until is not None and until > now


def _higher(a: str | None, b: str | None) -> str | None:
    return a if _RANK[a] >= _RANK[b] else b


def access(policy: RoomNamespace | None, room: str, actor: Actor, standing: RoomStanding,
           now: float, grant: Grant | None = None) -> Allowed | Refusal:
    """The rule of ``join``, and of ``who``, ``history``, ``members`` and ``send`` on a room.

    Args:
        policy: the room's namespace policy (None: the namespace is not configured).
        standing: the actor's standing in the room, read from the backend.
        grant: a room token for this room held by the connection, if any.
    """
    if policy is None:
        return Refusal(FORBIDDEN, f"namespace {namespace_of(room)!r} is not open to users")
    if actor.admin:
        if policy.access == MEMBERS and not standing.exists:
            return Refusal(NOT_FOUND, f"no room {room}")
        return Allowed(OWNER, admin=True)
    if _active(standing.banned_until, now):
        assert standing.banned_until is not None
        return Refusal(FORBIDDEN, describe_until("banned", room, standing.banned_until))
    role = standing.role
    until = math.inf
    if policy.access == MEMBERS:
        if not standing.exists:
            if policy.allow_create:
                return Refusal(NOT_FOUND, f"no room {room}")
            return Refusal(FORBIDDEN, f"not a member of {room}")
        if role is None:
            return Refusal(FORBIDDEN, f"not a member of {room}")
    elif policy.access == TOKEN:
        held = grant is not None and grant.room == room and grant.expires_at > now
        if held:
            assert grant is not None
            role = _higher(role, grant.role)
            until = grant.expires_at
        elif not claim_grants(actor.claim, room):
            return Refusal(FORBIDDEN, f"{room} is not granted by your token")
    return Allowed(role, until=until)


def may_join(policy: RoomNamespace | None, room: str, actor: Actor, standing: RoomStanding,
             now: float, *, online: int, present: bool,
             grant: Grant | None = None) -> Allowed | Refusal:
    """:func:`access` plus ``max_members``: ``online`` distinct users are in the room now.

    A user already present (another connection) does not count twice.
    """
    verdict = access(policy, room, actor, standing, now, grant)
    if isinstance(verdict, Refusal) or policy is None:
        return verdict
    if policy.max_members and not present and online >= policy.max_members:
        return Refusal(FORBIDDEN, f"{room} is full ({policy.max_members} users online)")
    return verdict


def may_send(policy: RoomNamespace | None, room: str, actor: Actor, standing: RoomStanding,
             now: float, grant: Grant | None = None) -> Allowed | Refusal:
    """:func:`access`, then a mute refuses (admins are never muted)."""
    verdict = access(policy, room, actor, standing, now, grant)
    if isinstance(verdict, Allowed) and not verdict.admin and _active(standing.muted_until, now):
        assert standing.muted_until is not None
        return Refusal(FORBIDDEN, describe_until("muted", room, standing.muted_until))
    return verdict


def may_create(policy: RoomNamespace | None, room: str, actor: Actor,
               exists: bool) -> Refusal | None:
    """``create``: in a ``members`` namespace with ``allow_create`` (admins: any members one).

    Existence is looked at only once creating is allowed, so ``conflict`` tells nothing to
    someone who could not have created the room.
    """
    if policy is None:
        return Refusal(FORBIDDEN, f"namespace {namespace_of(room)!r} is not open to users")
    if policy.access != MEMBERS:
        return Refusal(FORBIDDEN, f"rooms in namespace {policy.name!r} are {policy.access} "
                                  "and need no create")
    if not (policy.allow_create or actor.admin):
        return Refusal(FORBIDDEN, f"rooms in namespace {policy.name!r} are created by "
                                  "the application, not by users")
    if exists:
        return Refusal(CONFLICT, f"{room} already exists")
    return None


def may_moderate(command: str, policy: RoomNamespace | None, room: str, actor: Actor,
                 standing: RoomStanding, now: float, *, target: str,
                 target_standing: RoomStanding, role: str | None = None,
                 grant: Grant | None = None) -> Refusal | None:
    """``add_member`` (with ``role``), ``remove_member``, ``ban``, ``unban``, ``mute``, ``unmute``.

    Raises:
        KeyError: ``command`` is not one of those.
    """
    needed = MODERATION[command]
    verdict = access(policy, room, actor, standing, now, grant)
    if isinstance(verdict, Refusal):
        return verdict
    if verdict.rank < needed:
        return Refusal(FORBIDDEN, f"only owners and moderators may {_VERBS[command]} {room}")
    if target == actor.user:
        return Refusal(FORBIDDEN, f"you cannot {command.replace('_', ' ')} yourself")
    target_rank = _RANK[target_standing.role]
    if target_rank >= verdict.rank:
        above = "an admin" if target_standing.role == OWNER else "an owner"
        return Refusal(FORBIDDEN, f"{target} is {_NAMES[str(target_standing.role)]} of {room}: "
                                  f"only {above} may do that")
    if command == "add_member":
        new_role = role or MEMBER
        if _RANK[new_role] >= verdict.rank:
            above = "an admin" if new_role == OWNER else "an owner"
            return Refusal(FORBIDDEN, f"only {above} may make {new_role}s of {room}")
    return None


def may_delete(policy: RoomNamespace | None, room: str, actor: Actor, standing: RoomStanding,
               now: float, *, author: str | None, grant: Grant | None = None) -> Refusal | None:
    """``delete`` in a room: its author, or an owner or moderator; ``author`` None: no such id."""
    verdict = access(policy, room, actor, standing, now, grant)
    if isinstance(verdict, Refusal):
        return verdict
    if author is None:
        return Refusal(NOT_FOUND, f"no such message in {room}")
    if author != actor.user and verdict.rank < MODERATOR_RANK:
        return Refusal(FORBIDDEN, "only the author or a moderator may delete a message")
    return None


def may_delete_direct(actor: Actor, author: str | None) -> Refusal | None:
    """``delete`` in a conversation: only the author (direct messages stay private)."""
    if author is None:
        return Refusal(NOT_FOUND, "no such message in this conversation")
    if author != actor.user:
        return Refusal(FORBIDDEN, "only the author may delete a message")
    return None
