"""Running a node as a process: build it from config, serve until a signal, reload on SIGHUP.

Kept apart from :mod:`chatd.server` so tests can run a :class:`~chatd.server.Node` in-process
and the CLI can run the same thing as ``chatd serve``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable

from chatd import config as config_module
from chatd import logs, systemd
from chatd.auth.keys import KeyRing
from chatd.backends.base import Backend
from chatd.config import Config
from chatd.errors import ChatdError, ConfigError
from chatd.server import Node

log = logging.getLogger("chatd")


def create_backend(config: Config) -> Backend:
    """The Redis backend when ``redis.url`` is set, else the embedded one (SQLite for accounts)."""
    if config.redis.url:
        from chatd.backends.redis import create_redis_backend

        return create_redis_backend(config)
    from chatd.backends.memory import create_memory_backend
    from chatd.backends.sqlite.state import SqliteState

    return create_memory_backend(config, SqliteState.for_state_dir(config.state_dir))


def build_node(config: Config, keyring: KeyRing) -> Node:
    return Node(config, create_backend(config), keyring)


async def serve(config: Config, *, sock: socket.socket | None = None,
                on_ready: Callable[[Node], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain; SIGHUP reloads. Returns the exit code.

    Under systemd (``Type=notify``): READY=1 once the port accepts, STATUS= with the connection
    count, WATCHDOG=1 from the event loop, RELOADING=1/READY=1 around a reload, STOPPING=1 at
    the drain. The listening socket comes from socket activation when there is one.
    """
    notifier = systemd.Notifier()
    soft, hard = systemd.raise_nofile_limit()
    if sock is None:
        passed = systemd.listen_sockets()
        if len(passed) > 1:
            for extra in passed:
                extra.close()
            raise ConfigError("LISTEN_FDS", f"chatd takes one listening socket, got {len(passed)} "
                              "(one ListenStream= in chatd.socket)")
        sock = passed[0] if passed else None
    keyring, created = KeyRing.from_config(config)
    if created is not None:
        log.info("generated a new HS256 signing secret", extra={"f": {"path": str(created)}})
    node = build_node(config, keyring)
    await node.start(sock)
    assert node.server is not None
    host, port = node.server.sockets[0].getsockname()[:2]
    log.info("listening", extra={"f": {
        "host": host, "port": port, "path": config.server.path,
        "node": config.node_id, "backend": "redis" if config.redis.url else "embedded",
        "socket_activated": sock is not None, "nofile": soft}})
    if soft < config.limits.max_connections + 100:
        log.warning("open files limit below limits.max_connections",
                    extra={"f": {"nofile": soft, "hard": hard,
                                 "max_connections": config.limits.max_connections}})

    def status() -> str:
        state = "draining " if node.draining else ""
        return f"{state}{len(node.connections)} connections on {host}:{port}"

    notifier.ready(status())
    heartbeat = asyncio.create_task(systemd.heartbeat(notifier, status))
    if on_ready is not None:
        on_ready(node)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_sighup() -> None:
        notifier.reloading("reloading configuration")
        error = reload(node)
        notifier.ready(status() if error is None else f"reload failed, kept the running "
                       f"config: {error}")

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()
    notifier.stopping(f"draining {len(node.connections)} connections")
    try:
        await node.drain()
    finally:
        heartbeat.cancel()
    return 0


def reload(node: Node) -> str | None:
    """Re-read the config file and keys; on any error keep the running config and say why.

    Returns:
        None when applied, else the error (naming the key), also logged.
    """
    old = node.config
    try:
        new = config_module.load(old.source or None)
        # Where the node listens and which backend it uses cannot change without a restart.
        new = _keep_fixed(new, old)
        keyring, _ = KeyRing.from_config(new)
    except ChatdError as exc:
        log.error("reload failed, keeping the running config", extra={"f": {"error": str(exc)}})
        return str(exc)
    node.apply(new, keyring)
    logs.set_level(new.log.level)
    log.info("reloaded", extra={"f": {"source": new.source or None}})
    return None


def _keep_fixed(new: Config, old: Config) -> Config:
    import dataclasses

    server = dataclasses.replace(new.server, host=old.server.host, port=old.server.port,
                                 node_id=old.server.node_id, state_dir=old.server.state_dir)
    return dataclasses.replace(new, server=server, redis=old.redis)
