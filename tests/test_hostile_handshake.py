"""Hostile input before the upgrade, against a real node: every abuse gets a clear HTTP answer
(or the socket is dropped when nothing sensible can be answered), the node is unharmed and a
bystander client connected throughout keeps getting answers.

Raw TCP is used where a WebSocket library would refuse to send the request at all.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd import config
from chatd.errors import ConfigError
from chatd.handshake import forwarded_client
from chatd.logs import JsonFormatter
from chatd.ratelimit import KeyedTokenBuckets
from chatd.server import Node
from tests.client import Client
from tests.conftest import NodeFactory
from tests.nodes import issue

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": KEY,
           "Sec-WebSocket-Version": "13"}


class Reply:
    """An HTTP answer read off a raw socket (status None: closed without an answer)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        self.headers = {k.lower(): v.strip() for k, _, v in
                        (line.partition(":") for line in lines[1:])}

    def json(self) -> Any:
        return orjson.loads(self.body)


def request(method: str = "GET", target: str = "/ws", headers: dict[str, str] | None = None,
            extra: list[tuple[str, str]] | None = None, version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers if headers is not None else UPGRADE).items()]
    lines += [f"{k}: {v}" for k, v in extra or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def exchange(node: Node, data: bytes, *, local: str = "127.0.0.1",
                   timeout: float = 5.0) -> Reply:
    """Send ``data`` on a fresh TCP connection; the server's answer up to the end of its head
    (a 101 keeps the socket open, so reading to EOF would wait), or what came before EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port, local_addr=(local, 0))
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
                length = int(Reply(raw).headers.get("content-length", "0") or 0)
                raw += await reader.readexactly(length)
            except asyncio.IncompleteReadError as exc:
                raw = exc.partial
            except ConnectionResetError:
                raw = b""
        return Reply(raw)
    finally:
        writer.transport.abort()


@pytest.fixture
async def bystander_node(node_factory: NodeFactory) -> AsyncIterator[tuple[Node, Client]]:
    """A node with short timeouts, and a bystander client that must stay served throughout."""
    node = await node_factory(server={"open_timeout": 0.5}, auth={"timeout": 1})
    bystander = await connected(node, "bystander")
    yield node, bystander
    await served(bystander)


async def connected(node: Node, user: str, **kwargs: Any) -> Client:
    c = await Client.open(f"ws://127.0.0.1:{node.port}/ws?token={issue(user)}", **kwargs)
    assert (await c.recv())["type"] == "welcome"
    return c


def auth_failures(node: Node) -> float:
    return sum(s.value for m in node.metrics.auth_failures.collect() for s in m.samples
               if s.name.endswith("_total"))


async def served(bystander: Client) -> None:
    assert (await bystander.request("ping", "pong"))["type"] == "pong"
    assert bystander.ws.close_code is None


# -- slow and oversized requests ---------------------------------------------------------------


async def test_slowloris_handshakes_are_dropped_after_open_timeout(
        bystander_node: tuple[Node, Client]) -> None:
    node, bystander = bystander_node
    data = request(target=f"/ws?token={issue('slow')}")

    async def trickle() -> float:
        """One byte every 50 ms (the request would take seconds); time until the drop."""
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        t0 = time.monotonic()
        try:
            for byte in data:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)  # the attacker's pace: the point of the test
                if reader.at_eof() or writer.transport.is_closing():
                    break
            else:
                raise AssertionError("the whole request was trickled in")
            assert await reader.read() == b""  # dropped without an answer
        except ConnectionResetError:
            pass
        finally:
            writer.transport.abort()
        return time.monotonic() - t0

    attackers = [asyncio.create_task(trickle()) for _ in range(20)]
    await served(bystander)  # while 20 slow requests are in flight
    durations = await asyncio.gather(*attackers)
    assert all(0.4 < d < 10.0 for d in durations), durations  # open_timeout, not the trickle
    assert {c.user for c in node.connections} == {"bystander"}


async def test_a_header_line_over_8_kib_answers_431(bystander_node: tuple[Node, Client]) -> None:
    node, _ = bystander_node
    reply = await exchange(node, request(extra=[("X-Big", "a" * 9000)]))
    assert reply.status == 431


async def test_more_than_128_headers_answers_431(bystander_node: tuple[Node, Client]) -> None:
    node, _ = bystander_node
    reply = await exchange(node, request(extra=[(f"X-H{i}", "v") for i in range(200)]))
    assert reply.status == 431


async def test_a_64_kib_token_in_the_query_answers_414(bystander_node: tuple[Node, Client]) -> None:
    node, _ = bystander_node
    reply = await exchange(node, request(target="/ws?token=" + "a" * 65536))
    assert reply.status == 414


async def test_a_64_kib_bearer_token_answers_431(bystander_node: tuple[Node, Client]) -> None:
    node, _ = bystander_node
    reply = await exchange(node, request(extra=[("Authorization", "Bearer " + "a" * 65536)]))
    assert reply.status == 431


async def test_a_long_token_under_the_line_limit_is_refused_401_without_echo(
        bystander_node: tuple[Node, Client]) -> None:
    node, _ = bystander_node
    token = "eyJ" + "A" * 8000
    reply = await exchange(node, request(target=f"/ws?token={token}"))
    assert reply.status == 401
    assert reply.json()["code"] == "unauthorized"
    assert token[:50].encode() not in reply.raw


# -- malformed upgrades ------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "status"), [
    ({"Sec-WebSocket-Key": "bad"}, 400),
    ({"Sec-WebSocket-Key": "AAAA"}, 400),  # base64, but not 16 bytes
    ({"Sec-WebSocket-Key": None}, 400),
    ({"Sec-WebSocket-Version": "8"}, 426),
    ({"Sec-WebSocket-Version": "13, 8"}, 426),
    ({"Sec-WebSocket-Version": None}, 400),
    ({"Upgrade": None}, 426),
    ({"Upgrade": "h2c"}, 426),
    ({"Connection": "keep-alive"}, 426),
], ids=lambda v: str(v))
async def test_bad_upgrade_headers_are_refused_before_any_token_is_checked(
        bystander_node: tuple[Node, Client], change: dict[str, str | None], status: int) -> None:
    node, _ = bystander_node
    headers = {k: v for k, v in {**UPGRADE, **change}.items() if v is not None}
    failures = auth_failures(node)
    token = issue("alice") + "x"  # refused, and counted, if it were ever verified
    reply = await exchange(node, request(target=f"/ws?token={token}", headers=headers))
    assert reply.status == status
    if status == 426 and "Sec-WebSocket-Version" in change:
        assert reply.headers["sec-websocket-version"] == "13"  # RFC 6455 section 4.4
    assert auth_failures(node) == failures
    assert (await exchange(node, request(target=f"/ws?token={token}"))).status == 401
    assert auth_failures(node) == failures + 1  # the counter does count verified tokens


async def test_repeated_key_origin_or_authorization_headers_answer_400(
        bystander_node: tuple[Node, Client]) -> None:
    node, _ = bystander_node
    token = issue("alice")
    for name, value in (("Sec-WebSocket-Key", KEY), ("Origin", "https://a.example"),
                        ("Authorization", f"Bearer {token}")):
        reply = await exchange(node, request(extra=[(name, value), (name, value)]))
        assert reply.status == 400, (name, reply.raw)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD",
                                    "TRACE", "FOO"])
async def test_methods_other_than_get_answer_405(bystander_node: tuple[Node, Client],
                                                 method: str) -> None:
    node, _ = bystander_node
    for target in ("/ws", "/healthz", "/readyz", "/metrics"):
        reply = await exchange(node, request(method, target))
        assert reply.status == 405, (method, target)
        assert reply.headers["allow"] == "GET"


async def test_unparseable_requests_are_dropped_without_an_answer(
        bystander_node: tuple[Node, Client]) -> None:
    """websockets closes what is not HTTP/1.x at all; nothing reaches chatd's code."""
    node, _ = bystander_node
    for data in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # TLS hello
                 b"GET /ws\r\n\r\n", b"GET /ws HTTP/2.0\r\n\r\n",
                 request(extra=[("Content-Length", "5")]) + b"hello",
                 request(extra=[("Transfer-Encoding", "chunked")]),
                 b"GET /ws HTTP/1.1\r\nBad Header\r\n\r\n", b"GET /\xff HTTP/1.1\r\n\r\n"):
        reply = await exchange(node, data)
        assert reply.status is None, (data, reply.raw)
    assert (await exchange(node, request(version="HTTP/1.0"))).status == 505


@pytest.mark.parametrize("target", ["//[x/ws", "http://[::1/ws", "/ws/../ws", "/WS", "/ws/",
                                    "*", "http://127.0.0.1/ws", "/%77s", "//evil/ws"])
async def test_odd_request_targets_answer_404_never_500(
        bystander_node: tuple[Node, Client], target: str) -> None:
    """Only origin-form ``/ws`` is the endpoint (absolute-form is for proxies, not servers)."""
    node, _ = bystander_node
    reply = await exchange(node, request(target=target))
    assert reply.status == 404, (target, reply.raw)
    assert (await exchange(node, request(target="/healthz?x=[", headers={}))).status == 200


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_random_requests_never_get_a_500_or_an_error_log(
        bystander_node: tuple[Node, Client], caplog: pytest.LogCaptureFixture,
        method: str) -> None:
    """A hypothesis run of odd targets and header values against the real node."""
    node, bystander = bystander_node
    caplog.set_level(logging.ERROR)
    header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                        exclude_characters="\x7f"), max_size=40)
    targets = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60)
    names = st.sampled_from(["Origin", "Authorization", "Sec-WebSocket-Key",
                             "Sec-WebSocket-Version", "Upgrade", "Connection", "Cookie",
                             "X-Forwarded-For", "Sec-WebSocket-Extensions",
                             "Sec-WebSocket-Protocol", "Host"])
    statuses: list[int | None] = []

    @settings(max_examples=60, deadline=None, database=None)
    @given(target=st.sampled_from(["/ws", "/ws?token=", "/healthz", "/metrics"]) | targets,
           headers=st.lists(st.tuples(names, header_text), max_size=6))
    def run(target: str, headers: list[tuple[str, str]]) -> None:
        data = request(method, target.replace(" ", ""), extra=headers)
        statuses.append(asyncio.run_coroutine_threadsafe(exchange(node, data), loop)
                        .result(10).status)

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(run)
    assert len(statuses) >= 60 and 500 not in statuses
    assert {101, 404, 405} & set(statuses)  # the strategies reach the endpoints
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await served(bystander)


# -- unauthenticated sockets and connection storms ---------------------------------------------


async def test_unauthenticated_sockets_are_capped_per_address_and_overall_then_freed(
        node_factory: NodeFactory) -> None:
    node = await node_factory(server={"max_unauthenticated_per_address": 3,
                                      "max_unauthenticated": 5},
                              auth={"timeout": 1})
    bystander = await connected(node, "bystander")
    url = f"ws://127.0.0.1:{node.port}/ws"
    first = [await Client.open(url) for _ in range(3)]
    reply = await exchange(node, request())
    assert (reply.status, reply.json()["code"]) == (503, "unavailable")
    assert reply.headers["retry-after"] == "5"
    # Another address (127.0.0.2 is loopback too) has its own allowance, up to the overall cap.
    others = [await Client.open(url, local_addr=("127.0.0.2", 0)) for _ in range(2)]
    assert (await exchange(node, request(), local="127.0.0.3")).status == 503
    # An authenticated connection does not count, and the bystander never noticed.
    await connected(node, "carol")
    await served(bystander)
    # auth.timeout frees them all (4408), and a new unauthenticated socket is let in.
    for c in [*first, *others]:
        assert (await c.closed())[0] == 4408
    assert sum(node.unauthenticated.values()) == 0
    late = await Client.open(url)
    await late.send(type="auth", token=issue("dave"))
    assert (await late.expect("welcome"))["user"] == "dave"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_connection_storm_from_one_address_gets_429_before_the_upgrade(
        node_factory: NodeFactory) -> None:
    node = await node_factory(server={"accept_rate_per_address": 5,
                                      "accept_burst_per_address": 20})
    clock = Clock()
    node.accept_buckets = KeyedTokenBuckets(clock=clock)
    bystander = await connected(node, "bystander", local_addr=("127.0.0.2", 0))
    token = issue("stormy")
    replies = await asyncio.gather(*(exchange(node, request(target=f"/ws?token={token}"))
                                     for _ in range(60)))
    statuses = [r.status for r in replies]
    # The burst: 20 handshakes from 127.0.0.1 (the bystander spent one of 127.0.0.2's).
    assert statuses.count(101) == 20
    refused = [r for r in replies if r.status == 429]
    assert len(refused) == 40
    assert refused[0].json()["code"] == "rate_limited"
    assert refused[0].headers["retry-after"] == "1"
    await served(bystander)
    # Other addresses are unaffected; one second later, 5 more are let in.
    assert (await exchange(node, request(), local="127.0.0.3")).status == 101
    clock.now += 1.0
    later = [await exchange(node, request()) for _ in range(6)]
    assert [r.status for r in later] == [101] * 5 + [429]


async def test_the_accept_rate_limit_can_be_switched_off(node_factory: NodeFactory) -> None:
    node = await node_factory(server={"accept_rate_per_address": 0,
                                      "accept_burst_per_address": 1})
    replies = await asyncio.gather(*(exchange(node, request()) for _ in range(30)))
    assert {r.status for r in replies} == {101}
    assert len(node.accept_buckets) == 0


# -- client addresses behind trusted proxies ---------------------------------------------------


PROXY = ("127.0.0.1/32", "10.0.0.0/8")


@pytest.mark.parametrize(("peer", "xff", "trusted", "client"), [
    ("127.0.0.1", ["203.0.113.7"], (), "127.0.0.1"),  # no trusted proxies: the header is ignored
    ("192.0.2.1", ["203.0.113.7"], PROXY, "192.0.2.1"),  # peer not a proxy: ignored
    ("127.0.0.1", [], PROXY, "127.0.0.1"),  # a proxy's own request (health check)
    ("127.0.0.1", ["203.0.113.7"], PROXY, "203.0.113.7"),
    ("127.0.0.1", ["198.51.100.1, 203.0.113.7"], PROXY, "203.0.113.7"),  # spoofed left part
    ("127.0.0.1", ["198.51.100.1, 203.0.113.7, 10.1.2.3"], PROXY, "203.0.113.7"),  # two proxies
    ("127.0.0.1", ["198.51.100.1", "203.0.113.7"], PROXY, "203.0.113.7"),  # repeated header
    ("127.0.0.1", ["10.0.0.1, 10.0.0.2"], PROXY, "10.0.0.1"),  # only proxies: the leftmost
    ("127.0.0.1", ["127.0.0.1, 203.0.113.7"], PROXY, "203.0.113.7"),  # client claims loopback
    ("127.0.0.1", ["not-an-ip, 203.0.113.7"], PROXY, "203.0.113.7"),
    ("127.0.0.1", ["203.0.113.7, not-an-ip"], PROXY, "127.0.0.1"),  # broken proxy: stop at it
    ("127.0.0.1", ["203.0.113.7:4711"], PROXY, "203.0.113.7"),
    ("127.0.0.1", ["[2001:db8::1]:4711"], PROXY, "2001:db8::1"),
    ("127.0.0.1", ["2001:db8::1"], PROXY, "2001:db8::1"),
    ("::ffff:127.0.0.1", ["203.0.113.7"], PROXY, "203.0.113.7"),
    ("127.0.0.1", [", ,203.0.113.7,"], PROXY, "203.0.113.7"),
    ("127.0.0.1", [",".join(["10.0.0.1"] * 100 + ["203.0.113.7"] + ["10.0.0.1"] * 3)], PROXY,
     "203.0.113.7"),
    ("127.0.0.1", [",".join(["10.0.0.1"] * 100)], PROXY, "10.0.0.1"),
])
def test_the_client_address_is_the_last_hop_not_a_trusted_proxy(
        peer: str, xff: list[str], trusted: tuple[str, ...], client: str) -> None:
    assert forwarded_client(peer, xff, trusted) == client


async def test_behind_a_trusted_proxy_limits_and_logs_see_the_real_client(
        node_factory: NodeFactory) -> None:
    node = await node_factory(server={"trusted_proxies": ["127.0.0.1/32"],
                                      "max_unauthenticated_per_address": 2},
                              metrics={"allow": ["127.0.0.1/32"]})
    url = f"ws://127.0.0.1:{node.port}/ws"
    behind = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
    c = await connected(node, "alice", additional_headers=behind)
    assert next(conn.addr for conn in node.connections if conn.user == "alice") == "203.0.113.7"
    # Per-address caps count the real client, not the proxy.
    held = [await Client.open(url, additional_headers={"X-Forwarded-For": "203.0.113.8"})
            for _ in range(2)]
    refused = await exchange(node, request(extra=[("X-Forwarded-For", "203.0.113.8")]))
    assert refused.status == 503
    assert (await exchange(node, request(extra=[("X-Forwarded-For", "203.0.113.9")]))).status \
        == 101
    # A peer that is not a trusted proxy cannot claim an address.
    spoof = await connected(node, "mallory", local_addr=("127.0.0.2", 0),
                            additional_headers={"X-Forwarded-For": "203.0.113.66"})
    assert next(conn.addr for conn in node.connections if conn.user == "mallory") == "127.0.0.2"
    # /metrics through the proxy is judged by the real client's address.
    metrics = request("GET", "/metrics", headers={"X-Forwarded-For": "203.0.113.7"})
    assert (await exchange(node, metrics)).status == 403
    assert (await exchange(node, request("GET", "/metrics", headers={}))).status == 200
    for client in (c, spoof, *held):
        await client.close()


async def test_login_throttling_behind_a_proxy_counts_each_real_client(
        node_factory: NodeFactory) -> None:
    node = await node_factory(server={"trusted_proxies": ["127.0.0.1/32"]},
                              auth={"login_attempts_per_address": 2,
                                    "login_attempts_per_user": 100})
    await node.accounts.add_user("dave", "correct horse")
    url = f"ws://127.0.0.1:{node.port}/ws"

    async def login(client_ip: str, password: str) -> tuple[int | None, str]:
        c = await Client.open(url, additional_headers={"X-Forwarded-For": client_ip})
        await c.send(type="login", username="dave", password=password)
        return await c.closed()

    assert (await login("203.0.113.1", "wrong"))[0] == 4401
    assert (await login("203.0.113.1", "wrong"))[0] == 4401
    assert await login("203.0.113.1", "wrong") == (4029, "too many login attempts")
    # Another client behind the same proxy is not throttled by the first one's failures.
    c = await Client.open(url, additional_headers={"X-Forwarded-For": "203.0.113.2"})
    await c.send(type="login", username="dave", password="correct horse")
    assert (await c.expect("welcome"))["user"] == "dave"


# -- cross-site WebSocket hijacking ------------------------------------------------------------


@pytest.mark.parametrize("origin", [
    "https://evil.example", "null", "HTTPS://CHAT.EXAMPLE.COM", "https://chat.example.com/",
    "https://chat.example.com.evil.example", "https://chat.example.com:443",
    "http://chat.example.com", "https://sub.chat.example.com", "",
])
async def test_a_browser_origin_off_the_allowlist_is_refused_403_even_with_a_valid_token(
        node_factory: NodeFactory, origin: str) -> None:
    """Exact match only: a browser always sends the exact serialized origin (RFC 6454), so
    anything else (another case, a trailing slash, a port, ``null`` from a sandboxed iframe
    or a file: page) is not the site on the allowlist."""
    node = await node_factory(server={"allowed_origins": ["https://chat.example.com"]})
    bystander = await connected(node, "bystander")
    for target in (f"/ws?token={issue('alice')}", "/ws"):
        reply = await exchange(node, request(target=target, extra=[("Origin", origin)]))
        assert (reply.status, reply.json()) == (403, {"code": "forbidden",
                                                      "message": "origin not allowed"})
    ok = await exchange(node, request(target=f"/ws?token={issue('alice')}",
                                      extra=[("Origin", "https://chat.example.com")]))
    assert ok.status == 101
    await served(bystander)


# -- state left behind ------------------------------------------------------------------------


async def test_handshakes_abandoned_after_the_token_check_leave_no_state_behind(
        node: Node) -> None:
    """A client that sends a valid token and resets the connection at once never reaches the
    handler; the claims verified for it must not stay in memory."""
    token = issue("alice")
    for _ in range(50):
        _, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(request(target=f"/ws?token={token}"))
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    assert node.server is not None
    async with asyncio.timeout(5):
        while node.server.handler_tasks:  # every handshake task has ended
            await asyncio.sleep(0.01)
    gc.collect()
    assert len(node.handshake_claims) == 0
    assert not node.connections


# -- logging hygiene ---------------------------------------------------------------------------


async def test_tokens_passwords_and_query_strings_never_reach_the_logs(
        node_factory: NodeFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="chatd")
    node = await node_factory(auth={"timeout": 1})
    await node.accounts.add_user("dave", "s3cret-pass-phrase")
    good, bad = issue("alice"), issue("alice") + "tampered"
    secrets = [good, bad, "s3cret-pass-phrase", "wrong-pass-phrase", "q-marker-77"]
    c = await connected(node, "alice")
    await c.request("auth", "tokens", token=bad)
    await c.close()
    await exchange(node, request(target=f"/ws?token={bad}&q=q-marker-77"))
    await exchange(node, request(target=f"/ws?token={good}&q=q-marker-77"))
    for password in ("wrong-pass-phrase", "s3cret-pass-phrase"):
        login = await Client.open(f"ws://127.0.0.1:{node.port}/ws?q=q-marker-77")
        await login.send(type="login", username="dave", password=password)
        if password.startswith("s3cret"):
            await login.expect("welcome")
            await login.close()
        else:
            await login.closed()
    first = await Client.open(f"ws://127.0.0.1:{node.port}/ws")
    await first.send(type="auth", token=bad)
    await first.closed()
    await node.drain()
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    assert any('"auth refused"' in line for line in lines)  # the logs were captured
    for line in lines:
        for secret in secrets:
            assert secret not in line, line
        assert "token=" not in line


# -- the settings of these defences ------------------------------------------------------------


def test_the_defences_are_on_by_default_and_proxies_untrusted() -> None:
    s = config.load(None, env={}).server
    assert (s.accept_rate_per_address, s.accept_burst_per_address) == (200.0, 1000)
    assert s.trusted_proxies == ()


@pytest.mark.parametrize(("server", "key"), [
    ({"accept_rate_per_address": -1}, "server.accept_rate_per_address"),
    ({"accept_rate_per_address": float("nan")}, "server.accept_rate_per_address"),
    ({"accept_rate_per_address": float("inf")}, "server.accept_rate_per_address"),
    ({"accept_rate_per_address": "fast"}, "server.accept_rate_per_address"),
    ({"accept_burst_per_address": 0}, "server.accept_burst_per_address"),
    ({"trusted_proxies": ["nginx"]}, "server.trusted_proxies[0]"),
    ({"trusted_proxies": ["10.0.0.0/8", "10.0.0.300"]}, "server.trusted_proxies[1]"),
    ({"trusted_proxies": "10.0.0.1"}, None),  # a single string is read as a one-item list
])
def test_bad_defence_settings_are_refused_naming_the_key(server: dict[str, Any],
                                                          key: str | None) -> None:
    if key is None:
        assert config.load(None, env={}, overrides={"server": server}).server.trusted_proxies \
            == ("10.0.0.1",)
        return
    with pytest.raises(ConfigError) as info:
        config.load(None, env={}, overrides={"server": server})
    assert info.value.key == key


async def test_unauthenticated_connections_are_counted_per_ipv6_64_like_the_accept_rate(
        node_factory: NodeFactory) -> None:
    node = await node_factory(server={"trusted_proxies": ["127.0.0.1/32"],
                                      "max_unauthenticated_per_address": 2,
                                      "accept_burst_per_address": 100})
    url = f"ws://127.0.0.1:{node.port}/ws"
    # One subscriber's /64 rotating the low bits must not get a fresh allowance each time.
    held = [await Client.open(url, additional_headers={"X-Forwarded-For": f"2001:db8:1:2::{i}"})
            for i in (1, 2)]
    other_host = [("X-Forwarded-For", "2001:db8:1:2::99")]
    assert (await exchange(node, request(extra=other_host))).status == 503
    other_block = [("X-Forwarded-For", "2001:db8:1:3::1")]
    assert (await exchange(node, request(extra=other_block))).status == 101
    for client in held:
        await client.close()
