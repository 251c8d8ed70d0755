"""chatd.systemd and the unit files, against the real things.

A real datagram socket stands in for systemd's notify socket, a listening socket is passed as fd 3
to a child the way systemd does it, and the unit files are checked by ``systemd-analyze`` (from
the Debian ``systemd`` package: missing, these tests fail rather than skip).
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chatd import config
from chatd.systemd import Notifier, heartbeat, listen_sockets, raise_nofile_limit

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
#: The console script `pip install` puts next to this interpreter: what /opt/chatd/venv/bin/chatd
#: is on an installed VM.
CHATD = Path(sys.executable).parent / "chatd"
INSTALLED_CHATD = "/opt/chatd/venv/bin/chatd"


# -- sd_notify ---------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket like systemd's, and its $NOTIFY_SOCKET value.

    A short directory: sun_path holds 108 bytes, too few for pytest's sentence-long test names.
    """
    path = tmp_path_factory.mktemp("n") / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)  # a deadline for each datagram, never a sleep
    yield sock, str(path)
    sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_notifier_sends_each_state_change_as_one_datagram_in_order(
        notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path}, monotonic_usec=lambda: 123456)

    assert notifier.enabled
    assert notifier.ready("3 connections")
    assert notifier.status("4 connections")
    assert notifier.watchdog()
    assert notifier.reloading("reloading configuration")
    assert notifier.ready("4 connections")
    assert notifier.stopping("draining 4 connections")

    assert [receive(sock) for _ in range(6)] == [
        ["READY=1", "STATUS=3 connections"],
        ["STATUS=4 connections"],
        ["WATCHDOG=1"],
        ["RELOADING=1", "MONOTONIC_USEC=123456", "STATUS=reloading configuration"],
        ["READY=1", "STATUS=4 connections"],
        ["STOPPING=1", "STATUS=draining 4 connections"],
    ]


def test_reloading_carries_the_monotonic_clock_in_microseconds(
        notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier({"NOTIFY_SOCKET": path}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    fields = receive(sock)
    assert fields[0] == "RELOADING=1"
    usec = int(fields[1].removeprefix("MONOTONIC_USEC="))
    assert before <= usec <= after


def test_messages_carry_the_senders_pid_so_notify_access_main_accepts_them(
        notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    # systemd sets SO_PASSCRED and attributes each datagram to the pid in SCM_CREDENTIALS.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    Notifier({"NOTIFY_SOCKET": path}).ready()

    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    assert data == b"READY=1"
    ((level, kind, creds),) = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    pid, uid, gid = array.array("i", creds)
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


def test_an_at_sign_names_a_socket_in_the_abstract_namespace() -> None:
    name = f"chatd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert receive(sock) == ["READY=1"]


def test_a_status_line_stays_one_field_whatever_its_text(
        notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    Notifier({"NOTIFY_SOCKET": path}).status("reload refused:\nauth.leeway: too big")
    assert receive(sock) == ["STATUS=reload refused: auth.leeway: too big"]


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}])
def test_without_a_usable_notify_socket_the_notifier_does_nothing(env: dict[str, str]) -> None:
    notifier = Notifier({**env, "WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert not notifier.ready("up")
    assert not notifier.stopping()


def test_a_vanished_notify_socket_is_reported_not_raised(tmp_path_factory: pytest.TempPathFactory,
                                                          ) -> None:
    path = tmp_path_factory.mktemp("n") / "gone"
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),  # inherited by a child: the watchdog is its parent's business
    ("0", None, None),
    ("soon", None, None),
    (None, None, None),
])
def test_the_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
        usec: str | None, pid: str | None, expected: float | None) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid() if pid == "self" else os.getpid() + 1)
    assert Notifier(env).watchdog_interval() == expected


async def test_heartbeat_pings_the_watchdog_and_sends_status_only_when_it_changes(
        notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})  # ping every 10 ms
    count = [3]
    task = asyncio.create_task(heartbeat(notifier, lambda: f"{count[0]} connections"))
    try:
        async with asyncio.timeout(5):
            assert (await loop.sock_recv(sock, 4096)).split(b"\n") == [
                b"WATCHDOG=1", b"STATUS=3 connections"]
            assert await loop.sock_recv(sock, 4096) == b"WATCHDOG=1"
            count[0] = 4
            while (data := await loop.sock_recv(sock, 4096)) == b"WATCHDOG=1":
                pass
            assert data.split(b"\n") == [b"WATCHDOG=1", b"STATUS=4 connections"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_heartbeat_without_a_watchdog_sends_only_status_changes(
        notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    notifier = Notifier({"NOTIFY_SOCKET": path})
    count = [1]
    task = asyncio.create_task(heartbeat(notifier, lambda: f"{count[0]} connections", every=0.01))
    try:
        async with asyncio.timeout(5):
            assert await loop.sock_recv(sock, 4096) == b"STATUS=1 connections"
            count[0] = 2
            assert await loop.sock_recv(sock, 4096) == b"STATUS=2 connections"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_heartbeat_returns_at_once_outside_systemd() -> None:
    async with asyncio.timeout(5):
        await heartbeat(Notifier({}), lambda: "unused")


# -- socket activation -------------------------------------------------------------------------

# What systemd does between fork and exec: the socket to fd 3, LISTEN_PID = the pid that will
# read it (exec keeps the pid), then exec the service.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
"""

CHILD = """
import json, os, sys
from chatd.errors import ConfigError
from chatd.systemd import listen_sockets
try:
    socks = listen_sockets()
except ConfigError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
    sys.exit(2)
print(json.dumps({
    "addresses": [s.getsockname() for s in socks],
    "inheritable": os.get_inheritable(3),
    "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}), flush=True)
conn, _ = socks[0].accept()
conn.sendall(b"accepted by the activated process")
conn.close()
"""


def activate(fd: int, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, str(fd), CHILD], pass_fds=(fd,), cwd=ROOT,
        env={**os.environ, "LISTEN_FDS": "1", **env}, stdout=subprocess.PIPE, text=True)


def test_a_socket_passed_as_fd_3_is_taken_and_accepts_connections() -> None:
    with (socket.create_server(("127.0.0.1", 0)) as listener,
          activate(listener.fileno(), LISTEN_FDNAMES="chatd.socket") as child):
        try:
            assert child.stdout is not None
            report = json.loads(child.stdout.readline())
            assert report == {
                "addresses": [list(listener.getsockname())],
                "inheritable": False,  # our own children must not keep the port open
                "left": [],  # nor believe the fds are theirs
            }
            with socket.create_connection(listener.getsockname(), timeout=5) as client:
                assert client.recv(100) == b"accepted by the activated process"
            assert child.wait(timeout=10) == 0
        finally:
            child.kill()


@pytest.mark.parametrize("make", [
    lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),  # ListenDatagram=
    lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),  # not listening, as Accept=yes
])
def test_a_passed_fd_that_is_not_a_listening_socket_is_a_config_error(
        make: Callable[[], socket.socket]) -> None:
    with make() as sock, activate(sock.fileno()) as child:
        out, _ = child.communicate(timeout=10)
    assert child.returncode == 2
    assert json.loads(out)["error"].startswith(
        "LISTEN_FDS: fd 3 is not a listening stream socket")


def test_a_passed_fd_that_is_not_a_socket_is_a_config_error() -> None:
    read, write = os.pipe()
    try:
        with activate(read) as child:
            out, _ = child.communicate(timeout=10)
    finally:
        os.close(read)
        os.close(write)
    assert child.returncode == 2
    assert json.loads(out)["error"] == (
        "LISTEN_FDS: fd 3 is not a socket: Socket operation on non-socket")


def test_sockets_meant_for_another_process_are_ignored_and_the_variables_unset() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "A": "b"}
    assert listen_sockets(env) == []
    assert env == {"A": "b"}


def test_without_socket_activation_there_are_no_sockets() -> None:
    assert listen_sockets({}) == []
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert listen_sockets(env, unset_environment=False) == []
    assert env == {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}


# -- open files limit --------------------------------------------------------------------------


def test_the_soft_open_files_limit_is_raised_to_the_hard_limit() -> None:
    code = """
import resource
from chatd.systemd import raise_nofile_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
print(hard, *raise_nofile_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    hard, soft_after, hard_after, soft_now, hard_now = map(int, out.stdout.split())
    assert hard > 256
    assert soft_after == hard_after == soft_now == hard_now == hard


def test_raising_the_open_files_limit_again_changes_nothing() -> None:
    first = raise_nofile_limit()
    assert raise_nofile_limit() == first
    assert first[0] == first[1]


# -- the unit files ----------------------------------------------------------------------------


def unit_settings(name: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of a repeated key in order."""
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, f"write {value!r} as N or Ns or Nmin"
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze not found: install the Debian 'systemd' package"
    return path


@pytest.fixture
def units_for_this_venv(tmp_path: Path) -> Path:
    """The units with /opt/chatd/venv/bin/chatd replaced by this venv's chatd.

    verify checks that every Exec*= binary exists; the console script pip installed here is the
    same file an install creates at /opt/chatd/venv/bin/chatd. Nothing else is changed.
    """
    assert CHATD.is_file(), f"{CHATD} missing: pip install -e . in this venv"
    for name in ("chatd.service", "chatd.socket"):
        text = (UNITS / name).read_text()
        (tmp_path / name).write_text(text.replace(INSTALLED_CHATD, str(CHATD)))
    return tmp_path


def test_the_units_pass_systemd_analyze_verify(units_for_this_venv: Path) -> None:
    service = (units_for_this_venv / "chatd.service").read_text()
    assert service.count(str(CHATD)) == 3  # ExecStartPre, ExecStart, ExecReload

    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(units_for_this_venv / "chatd.service"),
         str(units_for_this_venv / "chatd.socket")],
        capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_analyze_verify_would_catch_a_broken_unit(units_for_this_venv: Path) -> None:
    broken = units_for_this_venv / "chatd.service"
    broken.write_text(broken.read_text().replace(str(CHATD), "/nonexistent/chatd"))
    result = subprocess.run([systemd_analyze(), "verify", "--man=no", str(broken)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "/nonexistent/chatd" in result.stderr


def test_the_service_sandbox_scores_at_most_1_5_in_systemd_analyze_security(
        units_for_this_venv: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager",
         str(units_for_this_venv / "chatd.service")],
        capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for chatd\.service: (\d+\.\d+)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= 1.5, result.stdout


def test_systemd_waits_longer_than_chatd_takes_to_drain() -> None:
    s, r = config.ServerConfig(), config.RedisConfig()
    # drain_window is spent inside shutdown_timeout; then presence removal and the backend close.
    chatd_needs = s.shutdown_timeout + 2 * r.command_timeout
    (timeout,) = unit_settings("chatd.service")["TimeoutStopSec"]
    assert seconds(timeout) >= chatd_needs + 10


def test_the_service_runs_the_documented_commands() -> None:
    unit = unit_settings("chatd.service")
    assert unit["Type"] == ["notify"]
    assert unit["ExecStartPre"] == [f"{INSTALLED_CHATD} check-config"]
    assert unit["ExecStart"] == [f"{INSTALLED_CHATD} serve"]
    assert unit["ExecReload"] == [f"{INSTALLED_CHATD} check-config", "/bin/kill -HUP $MAINPID"]
    assert unit["Environment"] == ["CHATD_CONFIG=/etc/chatd/config.toml",
                                   "CHATD_STATE_DIR=%S/chatd"]
    # The watchdog interval leaves room for the heartbeat's default 5 s period.
    assert seconds(unit["WatchdogSec"][0]) >= 10


def test_the_socket_unit_listens_where_chatd_would_by_default() -> None:
    s = config.ServerConfig()
    unit = unit_settings("chatd.socket")
    assert unit["ListenStream"] == [f"{s.host}:{s.port}"]
    assert unit["Backlog"] == [str(s.backlog)]
    assert unit_settings("chatd.service")["Sockets"] == ["chatd.socket"]


SAMPLES = {
    "CHATD_JWT_SECRET": "s" * 48,
    "CHATD_REDIS_URL": "redis://:pw@10.0.0.5:6379/0",
    "CHATD_NODE_ID": "node-a",
    "CHATD_LOG_LEVEL": "debug",
}


def test_the_env_file_example_names_only_variables_chatd_reads(tmp_path: Path) -> None:
    text = (UNITS / "chatd.env.example").read_text()
    names = re.findall(r"^#?(CHATD_[A-Z_]+)=", text, flags=re.MULTILINE)
    assert sorted(names) == sorted(SAMPLES)
    base = {"HOME": str(tmp_path)}
    default = config.load(env=base)
    for name in names:
        assert config.load(env={**base, name: SAMPLES[name]}) != default, name
    # Nothing is set by default: a copied example never ships a placeholder secret.
    assert not re.findall(r"^CHATD_", text, flags=re.MULTILINE)


# -- the sandbox at run time: SystemCallFilter= and MemoryDenyWriteExecute= -----------------------
#
# verify and security read the unit; these run chatd's whole native stack under the unit's own
# syscall filter (loaded with libseccomp, which systemd itself links) and under the kernel's
# memory-deny-write-execute, which systemd >= 253 uses for MemoryDenyWriteExecute=yes.

SANDBOX = """
import ctypes, os, resource, sys
allowed, errno_name = sys.argv[1].split(), sys.argv[2]
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # as LimitNOFILE=1024:HARD
lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
SCMP_ACT_ALLOW, SCMP_ACT_ERRNO = 0x7FFF0000, 0x00050000
ctx = lib.seccomp_init(SCMP_ACT_ERRNO | getattr(__import__("errno"), errno_name))
for name in allowed:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0:  # names of other architectures and newer kernels do not resolve
        assert lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) == 0, name
assert lib.seccomp_load(ctx) == 0  # sets no_new_privs first, as NoNewPrivileges=yes does
os.execv(sys.executable, [sys.executable, "-c", sys.argv[3]])
"""

STACK = r"""
import ctypes, mmap, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1  # Linux >= 6.3
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0):
    sys.exit(f"PR_SET_MDWE failed (errno {ctypes.get_errno()}): this test needs Linux >= 6.3")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("MDWE is not in force: a writable+executable mapping was allowed")
except PermissionError:
    pass
try:
    os.sched_setaffinity(0, os.sched_getaffinity(0))  # in @resources, which the unit denies
    sys.exit("the syscall filter is not in force: sched_setaffinity was allowed")
except PermissionError:
    pass

# Everything chatd loads that is native code, used the way chatd uses it.
import asyncio, resource, ssl
import argon2, hiredis, jwt, orjson, prometheus_client, redis.asyncio, uvloop
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
import chatd.config, chatd.logs, chatd.metrics, chatd.protocol
from chatd.systemd import raise_nofile_limit

ph = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
assert ph.verify(ph.hash("pw"), "pw")
for key, alg in ((b"k" * 32, "HS256"), (ec.generate_private_key(ec.SECP256R1()), "ES256"),
                 (ed25519.Ed25519PrivateKey.generate(), "EdDSA")):
    pub = key if isinstance(key, bytes) else key.public_key()
    assert jwt.decode(jwt.encode({"sub": "a"}, key, algorithm=alg), pub, algorithms=[alg])
reader = hiredis.Reader()
reader.feed(b"*2\r\n$5\r\nhello\r\n:1\r\n")
assert reader.gets() == [b"hello", 1]
ssl.create_default_context()
prometheus_client.generate_latest(chatd.metrics.Metrics().registry)
# The launcher lowered the soft limit: setrlimit must still work (glibc uses prlimit64).
soft, hard = raise_nofile_limit()
assert soft == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[1], (soft, hard)

async def roundtrip():
    async def echo(ws):
        async for msg in ws:
            await ws.send(orjson.dumps({"echo": orjson.loads(msg)}).decode())
    async with serve(echo, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/ws", compression=None) as ws:
            await ws.send(b'{"x": "' + b"y" * 70000 + b'"}')  # masked by the C speedups
            assert len(await ws.recv()) > 70000

uvloop.run(roundtrip())
print("ok")
"""


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run([systemd_analyze(), "syscall-filter", "--no-pager"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and not line.lstrip().startswith("#"):
            members.append(line.strip())
    return groups


def unit_syscall_allow_list() -> set[str]:
    """SystemCallFilter= of the unit, resolved as systemd does: an allow list, then ~ removals."""
    groups = syscall_groups()

    def expand(item: str) -> set[str]:
        if not item.startswith("@"):
            return {item}
        return set().union(*(expand(member) for member in groups[item]))

    lines = unit_settings("chatd.service")["SystemCallFilter"]
    assert not lines[0].startswith("~"), "the first SystemCallFilter= line is the allow list"
    allowed: set[str] = set()
    for line in lines:
        names = set().union(*(expand(item) for item in line.lstrip("~").split()))
        allowed = allowed - names if line.startswith("~") else allowed | names
    return allowed


def test_the_whole_stack_runs_under_the_units_syscall_filter_and_memory_deny_write_execute(
        ) -> None:
    unit = unit_settings("chatd.service")
    assert unit["MemoryDenyWriteExecute"] == ["yes"]
    (errno_name,) = unit["SystemCallErrorNumber"]
    allowed = unit_syscall_allow_list()
    assert "execve" in allowed and "sched_setaffinity" not in allowed

    result = subprocess.run(
        [sys.executable, "-c", SANDBOX, " ".join(sorted(allowed)), errno_name, STACK],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr
