"""What the Redis backend modules share: the client, key names, error translation.

Every ``redis.*`` exception (and ``OSError`` / timeouts from its sockets) is translated into
:class:`chatd.errors.BackendUnavailable` here, at the edge (design note "Direction of
dependencies"), so the rest of chatd never sees a foreign exception.

Key layout (all under ``redis.prefix``, ``P`` below). Keys and channels of one room share the hash
tag ``{r:ROOM}`` and those of one conversation ``{d:A|B}``, so a later Redis Cluster with sharded
pub/sub can keep each room on one shard:

===========================  ===================================================================
``P{r:ROOM}:h``              stream: the room's history (``d:A|B`` for a conversation)
``P{r:ROOM}:c``              channel: the room's frames (messages and presence)
``P{r:ROOM}:pz`` / ``:pn``   presence: zset ``user|instance`` -> expiry ms; hash user -> entries
``P{u:USER}:c``              channel: direct messages of USER
``Pctl``                     channel: control events, every node subscribes
``Pctl:rooms``               channel: room changes (:class:`~chatd.backends.base.RoomChange`)
``Pprobe:INSTANCE``          channel: a node's own liveness probe
``Puser:NAME`` ...           account state, see :mod:`chatd.backends.redis.state`
===========================  ===================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from chatd.errors import BackendUnavailable, ConfigError

log = logging.getLogger("chatd.redis")

T = TypeVar("T")

#: Connections of the command client. A command holds one for a round trip, so a few dozen
#: carry tens of thousands of commands a second; past that, callers queue for a free one (a
#: blocking pool, bounded by the command timeout) instead of failing or opening without limit.
MAX_CONNECTIONS = 64


class Keys:
    """Key and channel names under one prefix (see the module docstring)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.control = f"{prefix}ctl".encode()
        self.room_control = f"{prefix}ctl:rooms".encode()

    def stream(self, stream: str) -> str:
        """History of a stream named by :func:`~chatd.backends.base.room_stream` / ``dm_stream``."""
        return f"{self.prefix}{{{stream}}}:h"

    def room_channel(self, room: str) -> bytes:
        return f"{self.prefix}{{r:{room}}}:c".encode()

    def user_channel(self, user: str) -> bytes:
        return f"{self.prefix}{{u:{user}}}:c".encode()

    def presence(self, room: str) -> tuple[str, str]:
        """The presence zset (entries with expiry) and hash (entries per user) of a room."""
        return f"{self.prefix}{{r:{room}}}:pz", f"{self.prefix}{{r:{room}}}:pn"

    def probe(self, instance: str) -> bytes:
        return f"{self.prefix}probe:{instance}".encode()

    def state(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)


def connection_options(command_timeout: float) -> dict[str, Any]:
    """Options common to the command client and the pub/sub connection.

    No retries inside redis-py: a command that timed out may have run, and retrying a publish
    would duplicate a message; the caller gets ``unavailable`` and decides. Stale pooled
    connections after a Redis restart are replaced by the pool's own check on checkout.
    """
    return {
        "socket_timeout": command_timeout,
        "socket_connect_timeout": command_timeout,
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
        "decode_responses": False,
    }


def create_client(url: str, command_timeout: float) -> aioredis.Redis:
    """The command client; ``url`` may carry a password or ACL user and use ``rediss://``."""
    try:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=command_timeout,
            **connection_options(command_timeout))
        return aioredis.Redis.from_pool(pool)
    except (ValueError, RedisError) as exc:  # a malformed URL that config validation let pass
        raise ConfigError("redis.url", str(exc)) from None


def create_pubsub_pool(url: str, command_timeout: float) -> aioredis.ConnectionPool:
    """A pool used only to make the dedicated pub/sub connection (URL options applied).

    Its reads have no socket timeout: a quiet channel is normal, and liveness is checked by the
    probe instead (:mod:`chatd.backends.redis.broker`).
    """
    options = connection_options(command_timeout)
    options["socket_timeout"] = None
    try:
        return aioredis.ConnectionPool.from_url(url, **options)
    except (ValueError, RedisError) as exc:
        raise ConfigError("redis.url", str(exc)) from None


@contextlib.contextmanager
def unavailable(what: str) -> Iterator[None]:
    """Translate every Redis or socket failure inside the block into ``BackendUnavailable``."""
    try:
        yield
    except ResponseError as exc:
        # OOM, READONLY, NOAUTH, MASTERDOWN... or a bug in a script: logged loudly either way.
        log.error("redis refused %s: %s", what, exc)
        raise BackendUnavailable() from exc
    except (RedisError, OSError, TimeoutError) as exc:
        log.debug("redis unavailable during %s: %r", what, exc)
        raise BackendUnavailable() from exc


async def call(what: str, timeout: float, make: Callable[[], Awaitable[T]], *,
               idempotent: bool = False) -> T:
    """Run ``make()`` within ``timeout``, failures translated into ``BackendUnavailable``.

    An ``idempotent`` call (a read, or a script that can safely run twice) is tried once more
    after a connection error: after a Redis restart, pooled connections fail once each before
    the pool notices. Timeouts are never retried, so a hung Redis costs one ``timeout``.
    """
    try:
        with unavailable(what):
            async with asyncio.timeout(timeout):
                return await make()
    except BackendUnavailable as exc:
        if not idempotent or not isinstance(exc.__cause__, RedisConnectionError):
            raise
    with unavailable(what):
        async with asyncio.timeout(timeout):
            return await make()


async def stop(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait for it to end, cancelling again while it keeps running.

    Python 3.11's ``asyncio.wait_for`` (used inside redis-py) can swallow a cancellation that
    arrives just as the awaited write completes; a loop that lost its cancel would then keep a
    shutdown waiting forever. The loops also check a stop flag for the same reason.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r", task.get_name(), task.exception())


def text(value: bytes | str | None) -> str | None:
    """A reply value as ``str`` (replies are bytes: the clients do not decode)."""
    if value is None or isinstance(value, str):
        return value
    return value.decode()
