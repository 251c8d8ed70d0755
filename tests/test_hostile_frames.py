"""Hostile WebSocket frames after the upgrade, against a real node.

Every case: a clear answer (an ``error`` frame or the close code of RFC 6455 / the contract),
the node unharmed, and a bystander client connected throughout still served.

Frames are crafted by hand (:func:`raw_frame`) because a well-behaved library will not send them;
the server's frames are read with ``websockets``' sans-I/O :class:`ClientProtocol`.

Covered in tests/test_server_limits.py, not repeated here:

- a client that never reads is closed 4002 while others keep receiving
  (``test_slow_consumer_is_closed_4002_while_others_keep_receiving``);
- a client sending as fast as it can gets ``rate_limited``, then 4029
  (``test_flood_is_rate_limited_then_closed_4029``);
- binary frames close 1003, whole frames over ``limits.max_frame_bytes`` 1009.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri
from websockets.utils import apply_mask

from chatd.server import Node
from tests.client import Client
from tests.conftest import NodeFactory
from tests.nodes import issue

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def raw_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
              mask: bool = True) -> bytes:
    """One frame exactly as given (RFC 6455 section 5.2), valid or not."""
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    n, bit = len(payload), 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + apply_mask(payload, key)


class RawWS:
    """A client connection that writes raw bytes and parses what the server sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: ClientProtocol) -> None:
        self.reader, self.writer, self.protocol = reader, writer, protocol
        self.frames: list[Frame] = []

    @classmethod
    async def open(cls, node: Node, user: str | None = "mallory", *,
                   rcvbuf: int | None = None) -> RawWS:
        query = f"?token={issue(user)}" if user else ""
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port, limit=1 << 20)
        if rcvbuf is not None:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                       rcvbuf)
        protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{node.port}/ws{query}"),
                                  max_size=None)
        protocol.send_request(protocol.connect())
        ws = cls(reader, writer, protocol)
        writer.write(b"".join(protocol.data_to_send()))
        async with asyncio.timeout(5):
            while protocol.state is State.CONNECTING:
                await ws._read()
        assert protocol.handshake_exc is None, protocol.handshake_exc
        if user:
            assert orjson.loads(await ws.text())["type"] == "welcome"
        return ws

    async def _read(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            self.protocol.receive_eof()
            return False
        self.protocol.receive_data(data)
        self.frames += [e for e in self.protocol.events_received() if isinstance(e, Frame)]
        self.protocol.data_to_send()  # automatic replies (pongs) are not sent back
        return True

    def send(self, opcode: int, payload: bytes | str, **kwargs: Any) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self.writer.write(raw_frame(opcode, data, **kwargs))

    async def text(self, timeout: float = 5.0) -> str:
        """The next text frame from the server."""
        async with asyncio.timeout(timeout):
            while True:
                for i, frame in enumerate(self.frames):
                    if frame.opcode is Opcode.TEXT:
                        del self.frames[i]
                        return bytes(frame.data).decode()
                if not await self._read():
                    raise ConnectionError("closed")

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str]:
        """The server's close frame (code, reason), or (None, "") for a bare TCP close."""
        try:
            async with asyncio.timeout(timeout):
                while self.protocol.close_rcvd is None and await self._read():
                    pass
        except ConnectionResetError:
            pass
        close = self.protocol.close_rcvd
        return (close.code, close.reason) if close else (None, "")

    def abort(self) -> None:
        self.writer.transport.abort()


PING_CMD = b'{"type":"ping","ref":"p"}'


@pytest.fixture
async def hostile(node_factory: NodeFactory) -> AsyncIterator[tuple[Node, Client]]:
    node = await node_factory(limits={"max_frame_bytes": 1024, "max_outbound_bytes": 65536,
                                      "rate": 100000, "burst": 100000},
                              auth={"timeout": 1})
    bystander = await Client.open(f"ws://127.0.0.1:{node.port}/ws?token={issue('bystander')}")
    assert (await bystander.recv())["type"] == "welcome"
    await bystander.request("join", "joined", room="lobby")
    yield node, bystander
    assert (await bystander.request("ping", "pong"))["type"] == "pong"
    ack = await bystander.request("send", "ack", room="lobby", text="still here")
    await bystander.expect("message", id=ack["id"])
    assert bystander.ws.close_code is None


async def test_a_valid_raw_client_is_answered(hostile: tuple[Node, Client]) -> None:
    """The harness itself: a hand-made masked frame, fragmented or not, gets its pong."""
    node, _ = hostile
    ws = await RawWS.open(node)
    ws.send(TEXT, PING_CMD)
    assert orjson.loads(await ws.text())["type"] == "pong"
    ws.send(TEXT, PING_CMD[:5], fin=False)
    ws.send(PING, b"interleaved control frames are allowed")
    ws.send(CONT, PING_CMD[5:12], fin=False)
    ws.send(CONT, PING_CMD[12:])
    assert orjson.loads(await ws.text())["type"] == "pong"
    ws.abort()


# -- invalid UTF-8 -----------------------------------------------------------------------------


@pytest.mark.parametrize("authenticated", [True, False])
async def test_invalid_utf8_in_a_text_frame_closes_1007(hostile: tuple[Node, Client],
                                                         authenticated: bool) -> None:
    node, _ = hostile
    ws = await RawWS.open(node, "mallory" if authenticated else None)
    ws.send(TEXT, b'{"type":"ping","x":"\xff\xfe"}')
    assert (await ws.closed())[0] == 1007
    ws.abort()


@pytest.mark.parametrize("payload", [
    b'{"type":"ping","x":"\xed\xa0\x80"}',  # a UTF-16 surrogate encoded in UTF-8
    b'{"type":"ping","x":"\xc0\xaf"}',  # overlong "/"
    b'{"type":"ping","x":"\xf4\x90\x80\x80"}',  # beyond U+10FFFF
    b'{"type":"ping","x":"\xe2\x82"}',  # truncated sequence
])
async def test_every_kind_of_malformed_utf8_closes_1007(hostile: tuple[Node, Client],
                                                        payload: bytes) -> None:
    node, _ = hostile
    ws = await RawWS.open(node)
    ws.send(TEXT, payload)
    assert (await ws.closed())[0] == 1007
    ws.abort()


async def test_utf8_split_across_fragments_is_checked_as_a_whole(
        hostile: tuple[Node, Client]) -> None:
    node, _ = hostile
    euro = "€".encode()  # three bytes, split between two fragments: fine
    ws = await RawWS.open(node)
    ws.send(TEXT, b'{"type":"ping","ref":"' + euro[:1], fin=False)
    ws.send(CONT, euro[1:] + b'"}')
    assert orjson.loads(await ws.text()) == {"type": "pong", "ref": "€"}
    ws.send(TEXT, b'{"type":"ping","ref":"' + euro[:1], fin=False)
    ws.send(CONT, b'x"}')  # the sequence never completes
    assert (await ws.closed())[0] == 1007
    ws.abort()


# -- size limits across fragments ----------------------------------------------------------


async def test_fragments_each_under_the_limit_but_over_it_together_close_1009(
        hostile: tuple[Node, Client]) -> None:
    node, _ = hostile  # limits.max_frame_bytes = 1024
    ws = await RawWS.open(node)
    ws.send(TEXT, b'{"type":"ping","pad":"' + b"x" * 500, fin=False)
    for _ in range(3):
        ws.send(CONT, b"x" * 300, fin=False)
    ws.send(CONT, b'"}')
    assert (await ws.closed())[0] == 1009
    ws.abort()


async def test_a_declared_length_over_the_limit_closes_1009_before_the_payload(
        hostile: tuple[Node, Client]) -> None:
    node, _ = hostile
    ws = await RawWS.open(node)
    # A header announcing 2**62 bytes, and no payload: nothing is buffered.
    ws.writer.write(bytes([0x81, 0x80 | 127]) + (2**62).to_bytes(8, "big") + os.urandom(4))
    assert (await ws.closed())[0] == 1009
    ws.abort()


# -- protocol violations -----------------------------------------------------------------------


@pytest.mark.parametrize(("frames", "code"), [
    ([(CONT, b"orphan", {})], 1002),  # continuation without a message
    ([(TEXT, b'{"type":', {"fin": False}), (TEXT, b"{}", {})], 1002),  # new message mid-way
    ([(PING, b"x", {"fin": False})], 1002),  # fragmented control frame
    ([(PING, b"x" * 126, {})], 1002),  # control payload over 125 bytes
    ([(TEXT, PING_CMD, {"rsv": 4})], 1002),  # RSV1 without permessage-deflate
    ([(TEXT, PING_CMD, {"rsv": 1})], 1002),
    ([(0x3, b"", {})], 1002),  # reserved data opcode
    ([(0xB, b"", {})], 1002),  # reserved control opcode
    ([(TEXT, PING_CMD, {"mask": False})], 1002),  # clients must mask
    ([(CLOSE, b"\x03", {})], 1002),  # one-byte close payload
    ([(CLOSE, (999).to_bytes(2, "big"), {})], 1002),  # invalid close code
    ([(CLOSE, (1004).to_bytes(2, "big"), {})], 1002),  # reserved close code
    ([(CLOSE, (1000).to_bytes(2, "big") + b"\xff", {})], 1007),  # close reason not UTF-8
    ([(BINARY, b"\x00", {})], 1003),  # the contract: no binary frames
], ids=lambda v: str(v)[:60] if isinstance(v, list) else str(v))
async def test_protocol_violations_close_with_the_rfc_6455_code(
        hostile: tuple[Node, Client], frames: list[tuple[int, bytes, dict[str, Any]]],
        code: int) -> None:
    node, _ = hostile
    ws = await RawWS.open(node)
    for opcode, payload, kwargs in frames:
        ws.send(opcode, payload, **kwargs)
    assert (await ws.closed())[0] == code
    ws.abort()
    async with asyncio.timeout(15):  # close_timeout: the raw client never answers the close
        while any(c.user == "mallory" for c in node.connections):
            await asyncio.sleep(0.02)


async def test_a_client_close_is_answered_and_cleaned_up(hostile: tuple[Node, Client]) -> None:
    node, _ = hostile
    ws = await RawWS.open(node)
    ws.send(TEXT, b'{"type":"join","room":"lobby"}')
    assert orjson.loads(await ws.text())["type"] == "joined"
    ws.send(CLOSE, Close(1000, "bye").serialize())
    assert await ws.closed() == (1000, "bye")
    ws.abort()
    async with asyncio.timeout(5):
        while any(c.user == "mallory" for c in node.connections):
            await asyncio.sleep(0.02)
    assert node.hub.members("lobby") == 1


async def test_an_auth_frame_trickled_after_the_upgrade_is_closed_4408(
        hostile: tuple[Node, Client]) -> None:
    node, _ = hostile  # auth.timeout = 1 s
    ws = await RawWS.open(node, None)
    # Only the start of a 256-byte frame ever arrives; the auth deadline still holds.
    ws.writer.write(bytes([0x81, 0x80 | 126]) + (256).to_bytes(2, "big") + b"\0\0\0\0{")
    assert await ws.closed() == (4408, "authentication timeout")
    ws.abort()


# -- floods ------------------------------------------------------------------------------------


async def test_a_ping_flood_is_answered_and_leaves_others_unharmed(
        hostile: tuple[Node, Client]) -> None:
    node, bystander = hostile
    ws = await RawWS.open(node)
    n = 5000
    ws.writer.write(b"".join(raw_frame(PING, i.to_bytes(4, "big")) for i in range(n)))
    ws.send(TEXT, PING_CMD)
    assert orjson.loads(await ws.text(timeout=20))["type"] == "pong"
    pongs = [f for f in ws.frames if f.opcode is Opcode.PONG]
    assert [int.from_bytes(f.data, "big") for f in pongs] == list(range(n))
    assert (await bystander.request("ping", "pong"))["type"] == "pong"
    ws.abort()


async def test_a_ping_flood_from_a_client_that_never_reads_is_cut_off(
        hostile: tuple[Node, Client]) -> None:
    """Pongs are written as pings are read; past ``limits.max_outbound_bytes`` (64 KiB here)
    of unread output the connection is aborted, so the node never buffers without bound."""
    node, bystander = hostile
    ws = await RawWS.open(node, rcvbuf=4096)
    chunk = b"".join(raw_frame(PING, b"p" * 125) for _ in range(1000))  # 131 kB of pings
    sent = 0
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        async with asyncio.timeout(30):
            while sent < 256 * len(chunk):  # 33 MB: far past any buffer on the way
                ws.writer.write(chunk)
                await ws.writer.drain()
                sent += len(chunk)
    assert (await bystander.request("ping", "pong"))["type"] == "pong"
    async with asyncio.timeout(5):
        while any(c.user == "mallory" for c in node.connections):
            await asyncio.sleep(0.02)
    ws.abort()


async def test_unsolicited_pongs_and_empty_frames_are_ignored(
        hostile: tuple[Node, Client]) -> None:
    node, _ = hostile
    ws = await RawWS.open(node)
    ws.writer.write(b"".join(raw_frame(PONG, b"x" * 125) for _ in range(2000)))
    ws.send(TEXT, b"", fin=False)
    ws.send(CONT, b"", fin=False)
    ws.send(CONT, PING_CMD)
    assert orjson.loads(await ws.text())["type"] == "pong"
    ws.abort()


async def test_thousands_of_joins_and_leaves_leave_no_room_or_presence_behind(
        hostile: tuple[Node, Client]) -> None:
    node, bystander = hostile
    c = await Client.open(f"ws://127.0.0.1:{node.port}/ws?token={issue('churn')}")
    assert (await c.recv())["type"] == "welcome"
    rounds, rooms = 2500, 300
    for batch in range(0, rounds, 250):
        for i in range(batch, batch + 250):
            room = "lobby" if i % 50 == 0 else f"r{i % rooms}"
            await c.send(type="join", room=room, ref=f"j{i}")
            await c.send(type="leave", room=room, ref=f"l{i}")
        for i in range(batch, batch + 250):
            assert (await c.expect("joined", ref=f"j{i}"))["type"] == "joined"
            assert (await c.expect("left", ref=f"l{i}"))["type"] == "left"
    # Past the room limit: answered, and nothing half-joined.
    for i in range(120):
        await c.send(type="join", room=f"many{i}", ref=f"m{i}")
    answers = [await c.expect(kind, ref=f"m{i}") for i in range(120)
               for kind in (("joined",) if i < 100 else ("error",))]
    assert [a["type"] for a in answers].count("joined") == 100
    assert {a.get("code") for a in answers if a["type"] == "error"} == {"too_many_rooms"}
    await c.close()
    async with asyncio.timeout(5):
        while any(conn.user == "churn" for conn in node.connections):
            await asyncio.sleep(0.02)
    # Only the bystander's room is left, everywhere rooms are tracked.
    assert node.hub.rooms == 1 and node.hub.members("lobby") == 1
    assert await node.backend.presence.members("lobby") == ["bystander"]
    for room in ("r0", "r299", "many0", "many99"):
        assert await node.backend.presence.members(room) == []
        assert node.hub.members(room) == 0
    # Internal tables (no public size): subscriptions and presence counters per room.
    assert set(node.backend.broker._rooms) == {"lobby"}  # type: ignore[attr-defined]
    assert set(node.backend.presence._rooms) == {"lobby"}  # type: ignore[attr-defined]
    assert not node.hub._pending
    who = await bystander.request("who", "who", room="lobby")
    assert who["members"] == ["bystander"]
