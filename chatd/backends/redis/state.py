"""Accounts, login sessions and revocations in Redis (the State of a multi-node cluster).

Keys (``P`` = ``redis.prefix``):

=========================  =====================================================================
``Puser:NAME``             hash: ``password_hash`` (absent for external-JWT users), ``disabled``,
                           ``created_at``
``Pusers``                 set of account names
``Pdisabled:NAME``         ``"1"`` while NAME is disabled: a copy of the hash field that
                           :meth:`RedisState.token_verdict` can read with one ``MGET``
``Pseen``                  hash: user -> last connection (unix seconds)
``Psess:SID``              hash: a :class:`SessionRecord` (``live``, ``spent`` as in
                           :mod:`chatd.backends.sessions`); expires with the session
``Pusess:USER``            zset: the user's session ids scored by expiry
``Pdeny:jti:KEY``          exists while a token is revoked (TTL = until - now); KEY is
                           :func:`~chatd.backends.sessions.jti_key` (scoped or the bare jti)
``Pdeny:sid:SID``          exists while session SID is revoked
``Pdeny:user:USER``        ``"issued_before skew"`` of a ``revoke_tokens``, with TTL
=========================  =====================================================================

Deny entries carry a TTL, so they vanish with the tokens they deny. The checks of an access token
(:meth:`RedisState.token_verdict`) are one ``MGET``: one round trip on every connection.
Refresh-token rotation is a Lua script, atomic against a concurrent rotation of the same session
on another node. Times come from ``clock`` (unix seconds, injectable) and TTLs are computed from
it, like :class:`~chatd.backends.sqlite.state.SqliteState`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from chatd.backends.base import (
    RefreshUpdate,
    RotateOutcome,
    SessionRecord,
    State,
    TokenVerdict,
    UserRecord,
)
from chatd.backends.redis.client import Keys, call
from chatd.backends.sessions import (
    MAX_BRANCHES,
    MAX_SPENT,
    decode_live,
    decode_spent,
    encode_live,
    encode_spent,
    jti_key,
)

T = TypeVar("T")

# KEYS[1] session. ARGV: presented, new hash, rotated_at, refreshes_today, day, grace, now,
# MAX_BRANCHES, MAX_SPENT. The rule of chatd.backends.sessions.rotate, in Lua so it is atomic
# against a concurrent rotation of the same session on another node (the contract suite holds
# both to it). Comparing hashes (not tokens) needs no constant time.
ROTATE = """
local s = redis.call('HMGET', KEYS[1], 'refresh_hash', 'live', 'spent', 'expires_at')
if not s[1] or tonumber(s[4]) <= tonumber(ARGV[7]) then
  return 'unknown'
end
local p = ARGV[1]
local branches = tonumber(ARGV[8])
local working = {s[1]}
for h in string.gmatch(s[2] or '', '%S+') do working[#working + 1] = h end
local function head(list, n)
  local out = {}
  for i = 1, math.min(#list, n) do out[i] = list[i] end
  return table.concat(out, ' ')
end
local others, found = {}, false
for _, h in ipairs(working) do
  if h == p then found = true else others[#others + 1] = h end
end
if found then
  local spent = {p .. '@' .. ARGV[3]}
  for e in string.gmatch(s[3] or '', '%S+') do spent[#spent + 1] = e end
  redis.call('HSET', KEYS[1], 'refresh_hash', ARGV[2], 'live', head(others, branches - 1),
             'spent', head(spent, tonumber(ARGV[9])), 'rotated_at', ARGV[3],
             'refreshes_today', ARGV[4], 'day', ARGV[5])
  return 'rotated'
end
for e in string.gmatch(s[3] or '', '%S+') do
  local at = string.find(e, '@', 1, true)
  if string.sub(e, 1, at - 1) == p then
    local grace = tonumber(ARGV[6])
    if grace > 0 and tonumber(ARGV[3]) - tonumber(string.sub(e, at + 1)) <= grace then
      -- A second tab or a lost answer: a new branch; the window keeps its first rotation.
      redis.call('HSET', KEYS[1], 'refresh_hash', ARGV[2], 'live', head(working, branches - 1),
                 'refreshes_today', ARGV[4], 'day', ARGV[5])
      return 'rotated'
    end
    return 'reused'
  end
end
return 'unknown'
"""

# KEYS[1] new session, KEYS[2] the user's session zset. ARGV: sid, expires_at (score), now,
# ttl ms, limit, then field/value pairs. Creation and the single-session policy in one step:
# two concurrent logins with limit 1 leave exactly one session.
CREATE_SESSION = """
redis.call('DEL', KEYS[1])
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
local ended = {}
local limit = tonumber(ARGV[5])
if limit > 0 then
  local prefix = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1])
  local live = {}
  for _, sid in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if sid ~= ARGV[1] then
      local created = redis.call('HGET', prefix .. sid, 'created_at')
      if created then
        live[#live + 1] = {tonumber(created), sid}
      else
        redis.call('ZREM', KEYS[2], sid)
      end
    end
  end
  table.sort(live, function(a, b)
    if a[1] ~= b[1] then return a[1] > b[1] end
    return a[2] > b[2]
  end)
  for i = limit, #live do
    redis.call('DEL', prefix .. live[i][2])
    redis.call('ZREM', KEYS[2], live[i][2])
    ended[#ended + 1] = live[i][2]
  end
end
return ended
"""

# KEYS[1] deny key. ARGV[1] ttl ms. Never shortens an existing entry.
DENY = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""

# KEYS[1] deny:user key. ARGV[1] issued_before, ARGV[2] ttl ms, ARGV[3] skew. The value is
# "issued_before skew". Widens, never narrows.
DENY_USER = """
local before = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local skew = tonumber(ARGV[3])
local cur = redis.call('GET', KEYS[1])
if cur then
  local b, k = string.match(cur, '^(%S+)%s*(%S*)$')
  before = math.max(before, tonumber(b))
  skew = math.max(skew, tonumber(k ~= '' and k or '0'))
  ttl = math.max(ttl, redis.call('PTTL', KEYS[1]))
end
redis.call('SET', KEYS[1], string.format('%.17g %.17g', before, skew), 'PX',
           string.format('%d', ttl))
return 1
"""

# KEYS[1] user hash, KEYS[2] disabled flag. ARGV[1] '1' or '0'.
SET_DISABLED = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'disabled', ARGV[1])
if ARGV[1] == '1' then
  redis.call('SET', KEYS[2], '1')
else
  redis.call('DEL', KEYS[2])
end
return 1
"""

# KEYS[1] session. ARGV[1] prefix of the user's session zset, ARGV[2] sid.
DELETE_SESSION = """
local user = redis.call('HGET', KEYS[1], 'user')
redis.call('DEL', KEYS[1])
if user then
  redis.call('ZREM', ARGV[1] .. user, ARGV[2])
end
return 1
"""


class RedisState(State):
    """:class:`~chatd.backends.base.State` in Redis, shared by every node.

    Args:
        client: the command client.
        keys: key names.
        command_timeout: bound of each call.
        clock: unix seconds (injectable for expiry tests).
    """

    def __init__(self, client: aioredis.Redis, keys: Keys, *, command_timeout: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._r = client
        self._k = keys
        self._timeout = command_timeout
        self._clock = clock
        self._rotate = client.register_script(ROTATE)
        self._deny_script = client.register_script(DENY)
        self._deny_user = client.register_script(DENY_USER)
        self._set_disabled = client.register_script(SET_DISABLED)
        self._delete_session = client.register_script(DELETE_SESSION)
        self._create_session = client.register_script(CREATE_SESSION)

    async def _run(self, what: str, make: Callable[[], Awaitable[T]], *,
                   idempotent: bool = True) -> T:
        """One call; all but a rotation may be retried once after a connection error."""
        return await call(what, self._timeout, make, idempotent=idempotent)

    def _user(self, name: str) -> str:
        return self._k.state("user", name)

    def _sess(self, sid: str) -> str:
        return self._k.state("sess", sid)

    # -- users -------------------------------------------------------------------------------

    async def get_user(self, name: str) -> UserRecord | None:
        raw = await self._run("get_user", lambda: self._r.hgetall(self._user(name)))
        return _user_record(name, raw)

    async def put_user(self, record: UserRecord) -> None:
        key = self._user(record.name)
        fields = {"disabled": "1" if record.disabled else "0",
                  "created_at": repr(float(record.created_at))}
        if record.password_hash is not None:
            fields["password_hash"] = record.password_hash

        async def write() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                if record.disabled:
                    pipe.set(self._k.state("disabled", record.name), "1")
                else:
                    pipe.delete(self._k.state("disabled", record.name))
                pipe.sadd(self._k.state("users"), record.name)
                await pipe.execute()

        await self._run("put_user", write)

    async def delete_user(self, name: str) -> bool:
        async def write() -> bool:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(self._user(name))
                pipe.delete(self._k.state("disabled", name))
                pipe.srem(self._k.state("users"), name)
                deleted, _, _ = await pipe.execute()
            return bool(deleted)

        return await self._run("delete_user", write, idempotent=False)

    async def list_users(self) -> list[UserRecord]:
        async def read() -> list[UserRecord]:
            raw_names: Any = await self._r.smembers(self._k.state("users"))
            names = sorted(n.decode() for n in raw_names)
            async with self._r.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._user(name))
                rows = await pipe.execute()
            return [r for n, raw in zip(names, rows, strict=True)
                    if (r := _user_record(n, raw)) is not None]

        return await self._run("list_users", read)

    async def note_seen(self, user: str) -> None:
        await self._run("note_seen", lambda: self._r.hset(self._k.state("seen"), user,
                                                          repr(self._clock())))

    async def user_known(self, user: str) -> bool:
        async def read() -> bool:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.exists(self._user(user))
                pipe.hexists(self._k.state("seen"), user)
                account, seen = await pipe.execute()
            return bool(account) or bool(seen)

        return await self._run("user_known", read)

    async def set_disabled(self, user: str, disabled: bool) -> bool:
        done = await self._run("set_disabled", lambda: self._set_disabled(
            keys=[self._user(user), self._k.state("disabled", user)],
            args=["1" if disabled else "0"]))
        return bool(done)

    # -- sessions ----------------------------------------------------------------------------

    async def create_session(self, record: SessionRecord, limit: int = 0) -> list[str]:
        now = self._clock()
        ttl_ms = max(1, int((record.expires_at - now) * 1000))
        fields: list[str] = [
            "sid", record.sid, "user", record.user, "device", record.device,
            "created_at", repr(float(record.created_at)),
            "expires_at", repr(float(record.expires_at)),
            "refresh_hash", record.refresh_hash, "live", encode_live(record.live),
            "spent", encode_spent(record.spent), "rotated_at", repr(float(record.rotated_at)),
            "refreshes_today", str(record.refreshes_today), "day", str(record.day),
        ]
        # Not retried: a creation that ran and lost its reply must not end another session.
        ended = await self._run("create_session", lambda: self._create_session(
            keys=[self._sess(record.sid), self._k.state("usess", record.user)],
            args=[record.sid, repr(float(record.expires_at)), repr(float(now)), ttl_ms,
                  max(0, limit), *fields]), idempotent=False)
        return [e.decode() for e in ended]

    async def get_session(self, sid: str) -> SessionRecord | None:
        """The session, or None when unknown or expired."""
        raw = await self._run("get_session", lambda: self._r.hgetall(self._sess(sid)))
        record = _session_record(raw)
        if record is None or record.expires_at <= self._clock():
            return None
        return record

    async def user_sessions(self, user: str) -> list[SessionRecord]:
        """The user's live sessions, oldest first."""
        index = self._k.state("usess", user)

        async def read() -> list[SessionRecord]:
            raw_sids: Any = await self._r.zrange(index, 0, -1)
            sids = [s.decode() for s in raw_sids]
            async with self._r.pipeline(transaction=False) as pipe:
                for sid in sids:
                    pipe.hgetall(self._sess(sid))
                rows = await pipe.execute()
            now = self._clock()
            live, gone = [], []
            for sid, raw in zip(sids, rows, strict=True):
                record = _session_record(raw)
                if record is None:
                    gone.append(sid)
                elif record.expires_at > now:
                    live.append(record)
            if gone:
                await self._r.zrem(index, *gone)
            return sorted(live, key=lambda r: (r.created_at, r.sid))

        return await self._run("user_sessions", read)

    async def delete_session(self, sid: str) -> None:
        await self._run("delete_session", lambda: self._delete_session(
            keys=[self._sess(sid)], args=[self._k.state("usess", ""), sid]))

    async def rotate_refresh(self, sid: str, presented_hash: str, update: RefreshUpdate,
                             grace: float) -> RotateOutcome:
        # Not retried: a rotation that ran and lost its reply would look like reuse.
        outcome = await self._run("rotate_refresh", lambda: self._rotate(
            keys=[self._sess(sid)],
            args=[presented_hash, update.new_hash, repr(float(update.rotated_at)),
                  update.refreshes_today, update.day, repr(float(grace)),
                  repr(float(self._clock())), MAX_BRANCHES, MAX_SPENT]), idempotent=False)
        return RotateOutcome(outcome.decode())

    # -- revocation --------------------------------------------------------------------------

    def _ttl_ms(self, until: float) -> int:
        return int((until - self._clock()) * 1000)

    async def revoke_jti(self, jti: str, until: float, *, issuer: str | None = None,
                         user: str | None = None) -> None:
        await self._deny(self._k.state("deny", "jti", jti_key(jti, issuer, user)), until)

    async def revoke_session(self, sid: str, until: float) -> None:
        await self._deny(self._k.state("deny", "sid", sid), until)

    async def _deny(self, key: str, until: float) -> None:
        ttl = self._ttl_ms(until)
        if ttl > 0:
            await self._run("revoke", lambda: self._deny_script(keys=[key], args=[ttl]))

    async def revoke_user_before(self, user: str, issued_before: float, until: float, *,
                                 skew: float = 0.0) -> None:
        ttl = self._ttl_ms(until)
        if ttl > 0:
            await self._run("revoke", lambda: self._deny_user(
                keys=[self._k.state("deny", "user", user)],
                args=[repr(float(issued_before)), ttl, repr(float(skew))]))

    async def token_verdict(self, user: str, jti: str, sid: str | None, iat: float,
                            issuer: str = "") -> TokenVerdict:
        keys = [self._k.state("disabled", user), self._k.state("deny", "user", user),
                self._k.state("deny", "jti", jti),
                self._k.state("deny", "jti", jti_key(jti, issuer, user))]
        if sid is not None:
            keys.append(self._k.state("deny", "sid", sid))
        values = await self._run("token_verdict", lambda: self._r.mget(keys))
        if values[0] == b"1":
            return TokenVerdict.DISABLED
        if any(v is not None for v in values[2:]):
            return TokenVerdict.REVOKED
        mark = values[1]
        if mark is not None:
            before, _, skew = (mark.decode() if isinstance(mark, bytes) else mark).partition(" ")
            if iat < float(before) + float(skew or "0") and not await self._minted_after(
                    user, sid, float(before)):
                return TokenVerdict.REVOKED
        return TokenVerdict.OK

    async def _minted_after(self, user: str, sid: str | None, mark: float) -> bool:
        """True when ``sid`` is a live session of ``user`` created at or after ``mark``."""
        if sid is None:
            return False
        session = await self.get_session(sid)
        return session is not None and session.user == user and session.created_at >= mark


def _s(raw: Any, field: str, default: str = "") -> str:
    value = raw.get(field.encode())
    return default if value is None else value.decode()


def _user_record(name: str, raw: Any) -> UserRecord | None:
    if not raw:
        return None
    pw = raw.get(b"password_hash")
    return UserRecord(name=name, password_hash=None if pw is None else pw.decode(),
                      disabled=raw.get(b"disabled") == b"1",
                      created_at=float(_s(raw, "created_at", "0")))


def _session_record(raw: Any) -> SessionRecord | None:
    if not raw or b"refresh_hash" not in raw:
        return None
    fields: dict[str, Any] = {
        "sid": _s(raw, "sid"), "user": _s(raw, "user"), "device": _s(raw, "device"),
        "created_at": float(_s(raw, "created_at", "0")),
        "expires_at": float(_s(raw, "expires_at", "0")),
        "refresh_hash": _s(raw, "refresh_hash"),
        "live": decode_live(_s(raw, "live")),
        "spent": decode_spent(_s(raw, "spent")),
        "rotated_at": float(_s(raw, "rotated_at", "0")),
        "refreshes_today": int(_s(raw, "refreshes_today", "0")),
        "day": int(_s(raw, "day", "0")),
    }
    return SessionRecord(**fields)
