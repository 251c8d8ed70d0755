"""The Redis backend: several chatd nodes sharing one Redis (``redis.url``).

The parts live in this package's modules (each under ~500 lines):

- :mod:`chatd.backends.redis.client`: the client, key layout, translation of every ``redis.*``
  exception into :class:`chatd.errors.BackendUnavailable`;
- :mod:`chatd.backends.redis.broker`: publishing and history (streams, Lua);
- :mod:`chatd.backends.redis.feed`: the node's pub/sub connection, subscriptions, liveness;
- :mod:`chatd.backends.redis.presence`: presence with a heartbeat TTL;
- :mod:`chatd.backends.redis.state`: accounts, sessions, revocations;
- :mod:`chatd.backends.redis.rooms`: created rooms, member lists, bans and mutes.

Use::

    backend = create_redis_backend(config)
    await backend.broker.start(handler)   # never fails; healthy() says when Redis answers
    ...
    await backend.presence.drain()        # graceful shutdown: presence removed now
    await backend.broker.close()          # also stops the presence heartbeat, closes the client

What a node must do, beyond the interface: join a room with ``subscribe_room`` *before* reading
its history (``recent`` / ``replay``) and drop frames the history already had, since a message
published in between arrives both ways; answer ``feed_lost`` by making every client resume
(close 4004), because direct messages and control events travel on interrupted channels too.

Delivery guarantees: a message is stored and published in one atomic step, so an acknowledged
message is in history (for ``history.ttl``, and across Redis restarts only with persistence).
Live delivery over pub/sub is at most once per node; a node that may have missed frames says so
through ``feed_lost``, and ``join`` with ``since`` then recovers the gap from history,
``recovered: true`` only when provably complete.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from chatd.backends.base import Backend
from chatd.backends.redis.broker import RedisBroker
from chatd.backends.redis.client import Keys, create_client, create_pubsub_pool
from chatd.backends.redis.feed import LINGER
from chatd.backends.redis.presence import RedisPresence
from chatd.backends.redis.rooms import RedisRooms
from chatd.backends.redis.state import RedisState
from chatd.config import Config

__all__ = ["RedisBroker", "RedisPresence", "RedisRooms", "RedisState", "create_redis_backend"]


def create_redis_backend(config: Config, *, clock: Callable[[], float] = time.time,
                         linger: float = LINGER) -> Backend:
    """The three parts over one Redis client; nothing connects until ``broker.start``.

    Args:
        config: ``redis.*``, ``history.*``, ``presence.ttl`` and ``server.node_id`` are used.
        clock: unix seconds for account state (sessions, deny entries).
        linger: seconds a channel stays subscribed after its last local member left.
    """
    r = config.redis
    keys = Keys(r.prefix)
    # Node ids are chosen by operators and may collide (or be reused by a restarted node): the
    # random suffix keeps every process's presence entries and probe channel its own.
    instance = f"{config.server.node_id or 'node'}#{secrets.token_hex(4)}"
    client = create_client(r.url, r.command_timeout)
    broker = RedisBroker(client, create_pubsub_pool(r.url, r.command_timeout), keys,
                         instance=instance, command_timeout=r.command_timeout,
                         probe_interval=r.probe_interval,
                         max_per_stream=config.history.max_per_room,
                         history_ttl=config.history.ttl, linger=linger)
    presence = RedisPresence(client, keys, instance=instance, ttl=config.presence.ttl,
                             command_timeout=r.command_timeout)
    broker.companions.append(presence)
    state = RedisState(client, keys, command_timeout=r.command_timeout, clock=clock)
    rooms = RedisRooms(client, keys, command_timeout=r.command_timeout, clock=clock)
    return Backend(broker=broker, presence=presence, state=state, rooms=rooms)
