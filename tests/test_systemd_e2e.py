"""A real ``chatd serve`` under a stand-in for systemd: notify socket, passed fd, signals.

Each test starts ``python -m chatd serve`` with ``$NOTIFY_SOCKET`` naming a datagram socket the
test reads, the way systemd runs a ``Type=notify`` service, and drives it with the signals
``systemctl reload`` (SIGHUP) and ``systemctl stop`` (SIGTERM) send.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
SECRET = "e2e-secret-" + "x" * 40
STATUS_ADDRESS = re.compile(r"on (127\.0\.0\.1):(\d+)$")

# systemd between fork and exec: the socket to fd 3, LISTEN_PID = the pid that will read it
# (exec keeps the pid), then exec the service.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""

CONFIG = """
[server]
port = 0
drain_window = "1s"
shutdown_timeout = "5s"

[limits]
max_text_chars = {max_text_chars}
"""


@dataclass
class Chatd:
    """One ``chatd serve`` process and the notifications it sent."""

    process: asyncio.subprocess.Process
    notify: socket.socket
    log: Path
    port: int = 0
    seen: list[list[str]] = field(default_factory=list)

    async def notification(self, *, skip_watchdog: bool = True) -> list[str]:
        """The next datagram's fields (WATCHDOG=1 alone skipped), within a deadline."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(15):
            while True:
                fields = (await loop.sock_recv(self.notify, 4096)).decode().split("\n")
                self.seen.append(fields)
                if not (skip_watchdog and fields == ["WATCHDOG=1"]):
                    return fields

    async def ready(self) -> list[str]:
        """Wait for READY=1; learn the port from its STATUS= (chatd may listen on port 0)."""
        fields = await self.notification()
        assert fields[0] == "READY=1", fields
        m = STATUS_ADDRESS.search(fields[-1])
        assert m, fields
        self.port = int(m.group(2))
        return fields

    async def exit_code(self, within: float) -> int:
        async with asyncio.timeout(within):
            return await self.process.wait()

    def log_events(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.log.read_text().splitlines()
                if line.startswith("{")]


@pytest.fixture
def notify_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path_factory.mktemp("n") / "notify"  # short: sun_path holds 108 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield sock, str(path)
    sock.close()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(max_text_chars=4000))
    return path


def chatd_env(tmp_path: Path, notify_path: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CHATD_", "LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    return {**env, "NOTIFY_SOCKET": notify_path, "CHATD_JWT_SECRET": SECRET,
            "CHATD_STATE_DIR": str(tmp_path / "state"), **extra}


@pytest.fixture
async def start(tmp_path: Path, notify_socket: tuple[socket.socket, str], config_file: Path,
                ) -> AsyncIterator[Callable[..., Any]]:
    """Start ``chatd serve`` (optionally socket-activated with ``fd``); killed at teardown."""
    sock, path = notify_socket
    started: list[Chatd] = []

    async def _start(fd: int | None = None, **env: str) -> Chatd:
        serve = ["-m", "chatd", "serve", "-c", str(config_file)]
        argv = [sys.executable, *serve] if fd is None else [
            sys.executable, "-c", ACTIVATE, str(fd), *serve]
        log = tmp_path / f"chatd-{len(started)}.log"
        with log.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=ROOT, env=chatd_env(tmp_path, path, **env), stderr=err,
                pass_fds=() if fd is None else (fd,))
        started.append(Chatd(process, sock, log))
        return started[-1]

    yield _start
    for node in started:
        if node.process.returncode is None:
            node.process.kill()
            await node.process.wait()


async def issue_token(config_file: Path, tmp_path: Path, user: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatd", "token", "issue", user, "-c", str(config_file),
        cwd=ROOT, env=chatd_env(tmp_path, ""), stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    assert process.returncode == 0
    return out.decode().strip()


async def http_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        line = await reader.readline()
        return int(line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


async def frame_with(ws: ClientConnection, **match: Any) -> dict[str, Any]:
    """The next frame whose fields include ``match`` (others, like our own messages, skipped)."""
    async with asyncio.timeout(10):
        while True:
            frame: dict[str, Any] = orjson.loads(await ws.recv())
            if all(frame.get(k) == v for k, v in match.items()):
                return frame


async def client(port: int, token: str) -> ClientConnection:
    ws = await connect(f"ws://127.0.0.1:{port}/ws?token={token}", compression=None)
    await frame_with(ws, type="welcome")
    return ws


async def test_serve_notifies_ready_status_watchdog_reloading_and_stopping_in_order(
        start: Callable[..., Any], config_file: Path, tmp_path: Path) -> None:
    token = await issue_token(config_file, tmp_path, "alice")
    chatd = await start(WATCHDOG_USEC="400000")  # a ping every 0.2 s

    await chatd.ready()
    # READY=1 means accepting now, not in a moment.
    assert await http_status(chatd.port, "/healthz") == 200
    ws = await client(chatd.port, token)
    while (await chatd.notification())[-1] != f"STATUS=1 connections on 127.0.0.1:{chatd.port}":
        pass

    chatd.process.send_signal(signal.SIGHUP)
    reloading = await chatd.notification()
    assert reloading[:2] == ["RELOADING=1", reloading[1]]
    assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1])
    assert await chatd.notification() == [
        "READY=1", f"STATUS=1 connections on 127.0.0.1:{chatd.port}"]

    chatd.process.send_signal(signal.SIGTERM)
    assert (await chatd.notification())[0] == "STOPPING=1"
    with pytest.raises(ConnectionClosed) as closed:
        await frame_with(ws, type="never")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert await chatd.exit_code(within=10) == 0

    kinds = [f[0].partition("=")[0] for f in chatd.seen]
    assert kinds[0] == "READY"
    assert "WATCHDOG" in kinds[: kinds.index("RELOADING")]
    assert [k for k in kinds if k not in ("WATCHDOG", "STATUS")] == [
        "READY", "RELOADING", "READY", "STOPPING"]


async def test_a_socket_activated_node_serves_the_passed_socket_and_a_restart_refuses_nothing(
        start: Callable[..., Any]) -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=128) as listener:
        port = listener.getsockname()[1]
        first = await start(fd=listener.fileno(), CHATD_PORT="1")  # the config's port is unused
        await first.ready()
        assert first.port == port
        assert await http_status(port, "/readyz") == 200
        first.process.send_signal(signal.SIGTERM)
        while (await first.notification())[0] != "STOPPING=1":
            pass
        assert await first.exit_code(within=10) == 0

        # Between two processes the socket (held here, as systemd holds it) queues the
        # connection instead of refusing it; the next process answers.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        second = await start(fd=listener.fileno())
        await second.ready()
        async with asyncio.timeout(10):
            assert (await reader.readline()).split()[1] == b"200"
        writer.close()
        await writer.wait_closed()
        second.process.send_signal(signal.SIGTERM)
        assert await second.exit_code(within=10) == 0


async def test_sighup_applies_a_valid_config_and_keeps_the_old_one_when_broken(
        start: Callable[..., Any], config_file: Path, tmp_path: Path) -> None:
    token = await issue_token(config_file, tmp_path, "alice")
    chatd = await start()
    await chatd.ready()
    ws = await client(chatd.port, token)
    await ws.send(orjson.dumps({"type": "join", "room": "r", "ref": "j"}).decode())
    await frame_with(ws, type="joined", ref="j")

    async def send(text: str, ref: str) -> dict[str, Any]:
        frame = {"type": "send", "room": "r", "text": text, "ref": ref}
        await ws.send(orjson.dumps(frame).decode())
        return await frame_with(ws, ref=ref)

    assert (await send("x" * 20, "before"))["type"] == "ack"

    config_file.write_text(CONFIG.format(max_text_chars=10))
    chatd.process.send_signal(signal.SIGHUP)
    assert (await chatd.notification())[0] == "RELOADING=1"
    assert (await chatd.notification())[0] == "READY=1"
    refused = await send("x" * 20, "after")  # the same connection, the new limit
    assert (refused["type"], refused["code"]) == ("error", "bad_request")
    assert "10" in refused["message"]

    config_file.write_text(CONFIG.format(max_text_chars='"many"'))
    chatd.process.send_signal(signal.SIGHUP)
    assert (await chatd.notification())[0] == "RELOADING=1"
    ready = await chatd.notification()
    assert ready[0] == "READY=1"
    assert ready[1].startswith("STATUS=reload failed") and "limits.max_text_chars" in ready[1]
    assert (await send("x" * 5, "kept"))["type"] == "ack"  # still connected, still limit 10
    assert (await send("x" * 20, "still"))["type"] == "error"

    failures = [e for e in chatd.log_events() if e["event"].startswith("reload failed")]
    assert len(failures) == 1 and "limits.max_text_chars" in failures[0]["error"]
    await ws.close()
    chatd.process.send_signal(signal.SIGTERM)
    assert await chatd.exit_code(within=10) == 0


async def test_sigterm_closes_every_client_with_1001_spread_over_the_drain_window_and_exits_0(
        start: Callable[..., Any], config_file: Path, tmp_path: Path) -> None:
    token = await issue_token(config_file, tmp_path, "alice")
    chatd = await start()
    await chatd.ready()
    clients = [await client(chatd.port, token) for _ in range(10)]

    async def closed_at(ws: ClientConnection) -> tuple[int | None, float]:
        with pytest.raises(ConnectionClosed) as closed:
            await frame_with(ws, type="never")
        return (closed.value.rcvd.code if closed.value.rcvd else None), time.monotonic()

    waiting = [asyncio.create_task(closed_at(ws)) for ws in clients]
    signalled = time.monotonic()
    chatd.process.send_signal(signal.SIGTERM)
    assert (await chatd.notification())[0] == "STOPPING=1"
    closes = await asyncio.gather(*waiting)
    assert await chatd.exit_code(within=5 + 5) == 0  # server.shutdown_timeout + a margin

    assert [code for code, _ in closes] == [1001] * 10
    times = sorted(t for _, t in closes)
    # drain_window = 1 s: reconnects are spread out, and all were told within the window.
    assert times[-1] - times[0] >= 0.5
    assert times[-1] - signalled < 1 + 2
