"""A small protocol client for tests: real WebSocket connections, waits with deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

DEADLINE = 5.0


class Client:
    """One connection.

    ``frames`` keeps everything received, in order; ``unread`` holds what no ``expect`` or
    ``request`` has taken yet, so waiting for one frame never loses another.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.unread: list[dict[str, Any]] = []

    #: Every client opened by the running test; an autouse fixture closes them afterwards.
    opened: ClassVar[list[Client]] = []

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Client:
        kwargs.setdefault("compression", None)
        kwargs.setdefault("open_timeout", DEADLINE)
        client = cls(await connect(url, **kwargs))
        cls.opened.append(client)
        return client

    async def send(self, **frame: Any) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def _receive(self) -> dict[str, Any]:
        frame: dict[str, Any] = orjson.loads(await self.ws.recv())
        self.frames.append(frame)
        return frame

    async def recv(self, timeout: float = DEADLINE) -> dict[str, Any]:
        """The next unread frame."""
        if self.unread:
            return self.unread.pop(0)
        async with asyncio.timeout(timeout):
            return await self._receive()

    async def take(self, match: Callable[[dict[str, Any]], bool],
                   timeout: float = DEADLINE) -> dict[str, Any]:
        """The first unread frame ``match`` accepts; the frames before it stay unread."""
        for i, frame in enumerate(self.unread):
            if match(frame):
                return self.unread.pop(i)
        async with asyncio.timeout(timeout):
            while True:
                frame = await self._receive()
                if match(frame):
                    return frame
                self.unread.append(frame)

    async def expect(self, kind: str, timeout: float = DEADLINE, **fields: Any) -> dict[str, Any]:
        """The first unread frame of type ``kind`` whose ``fields`` match."""
        return await self.take(
            lambda f: f.get("type") == kind and all(f.get(k) == v for k, v in fields.items()),
            timeout)

    async def request(self, kind: str, answer: str, **fields: Any) -> dict[str, Any]:
        """Send a command with a fresh ref; its answer (``answer`` or an ``error``)."""
        self._refs = getattr(self, "_refs", 0) + 1
        ref = f"r{self._refs}"
        await self.send(type=kind, ref=ref, **fields)
        return await self.take(lambda f: f.get("ref") == ref and f.get("type") in (answer, "error"))

    def seen(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        """Every frame of type ``kind`` received so far (read or not)."""
        return [f for f in self.frames
                if f.get("type") == kind and all(f.get(k) == v for k, v in fields.items())]

    async def closed(self, timeout: float = DEADLINE) -> tuple[int | None, str]:
        """Wait for the server to close; returns (code, reason). Frames meanwhile are kept."""
        async with asyncio.timeout(timeout):
            try:
                while True:
                    self.unread.append(await self._receive())
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                return (rcvd.code, rcvd.reason) if rcvd else (None, "")

    async def close(self) -> None:
        await self.ws.close()

    @classmethod
    async def close_all(cls) -> None:
        clients, cls.opened = cls.opened, []
        for client in clients:
            try:
                async with asyncio.timeout(2):
                    await client.ws.close()
            except TimeoutError:
                client.ws.transport.abort()
