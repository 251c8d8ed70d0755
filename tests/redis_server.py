"""A real ``redis-server`` process for tests: free port, private temp dir, never the shared one.

Used by the backend contract and fault tests and by the end-to-end tests (several ``chatd serve``
processes against one Redis). The server can be stopped, killed (SIGKILL), restarted on the same
port (so clients reconnect to the same URL), and paused with SIGSTOP / resumed with SIGCONT to
simulate a Redis that hangs without closing its sockets.

With ``tls=True`` it listens with TLS only (a private CA made for the test), and :attr:`url` is a
``rediss://`` URL naming that CA. ``redis-server`` missing from ``PATH`` raises
:class:`RedisServerMissing`: Redis tests must fail loudly, never skip.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote


class RedisServerMissing(RuntimeError):
    """``redis-server`` is not installed; the Redis tests cannot run (and must not pass)."""


class RedisServer:
    """One ``redis-server`` child process.

    Args:
        directory: a private directory for its log, AOF and dump files.
        aof: append-only persistence (``appendfsync always``), so data survives a restart.
            Off, a restart loses every key, as a Redis without persistence does.
        password: ``requirepass``; the URL then carries it.
        port: a fixed port; by default a free one is picked.
        tls: listen with TLS only, with a certificate from a CA made in ``directory``.
        extra: more ``--option value`` arguments for ``redis-server``.
    """

    def __init__(self, directory: str | os.PathLike[str], *, aof: bool = False,
                 password: str | None = None, port: int | None = None,
                 tls: bool = False, extra: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerMissing(
                "redis-server is not on PATH; install it (apt-get install redis-server): "
                "the Redis tests need a real server and are never skipped")
        self.binary = binary
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aof = aof
        self.password = password
        self.port = port or free_port()
        self.tls = tls
        self.extra = list(extra)
        self.ca_file: Path | None = None
        if tls:
            self.ca_file, self._cert, self._key = make_tls_files(self.dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    # -- addresses ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start and wait until it answers PING (loading an AOF included)."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        ports = ["--port", str(self.port)]
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self._cert), "--tls-key-file", str(self._key),
                     "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no"]
        args = [
            self.binary,
            *ports,
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "always",
            "--appendfilename", "chatd-test.aof",
            "--dbfilename", "chatd-test.rdb",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.paused = False
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll PING until ``+PONG`` (a loading server answers ``-LOADING``), with a deadline."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if self.ping():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not become ready "
                                   f"within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers PONG right now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as raw:
                if not self.tls:
                    return self._ping_on(raw)
                context = ssl.create_default_context(cafile=str(self.ca_file))
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    return self._ping_on(s)
        except (OSError, ssl.SSLError):
            return False

    def _ping_on(self, s: socket.socket) -> bool:
        cmd = b""
        if self.password:
            cmd += _resp(b"AUTH", self.password.encode())
        cmd += _resp(b"PING")
        s.sendall(cmd)
        data = b""
        while b"PONG" not in data and not data.startswith(b"-"):
            chunk = s.recv(4096)
            if not chunk:
                return False
            data += chunk
        return b"+PONG" in data

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM); a paused server is resumed first so it can exit."""
        if not self.running:
            return
        assert self.proc is not None
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: connections drop at once, unpersisted data is gone."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.paused = False

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Start again on the same port (after :meth:`stop` or :meth:`kill`)."""
        if self.running:
            self.stop()
        return self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: sockets stay open, nothing is answered (a hung Redis)."""
        assert self.proc is not None and self.running
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def close(self) -> None:
        """Stop for good (fixture teardown)."""
        with contextlib.suppress(Exception):
            self.stop()
        if self.running:
            self.kill()

    def __enter__(self) -> RedisServer:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (never 6379, the shared Redis)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379:
            return port


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chatd test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths
