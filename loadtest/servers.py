"""Servers under test: started by the harness (``--start-server``) or found by URL, and probed.

A probe reads a server's CPU seconds and resident memory so results can be given per delivery
and per connection. For a process the harness started (or ``--server-pid``) it reads
``/proc/<pid>/stat`` and ``/proc/<pid>/status`` (exact, no cost to the server); otherwise it
scrapes ``GET /metrics`` (``process_cpu_seconds_total``, ``process_resident_memory_bytes`` from
prometheus-client's process collector), which chatd and the ceiling both serve.

When the harness starts chatd itself it writes a config that lifts the limits meant for hostile
clients and not for a benchmark: the per-connection message rate (``[limits] rate``/``burst``:
the default 20/s would throttle a sender), and the connection caps.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: Config the harness gives a chatd it starts: benchmark clients are not abusive ones.
BENCH_CONFIG = """\
# Written by the chatd load harness (loadtest/servers.py) for a benchmark run.
[server]
max_unauthenticated = 100000
accept_rate_per_address = 0
max_unauthenticated_per_address = 100000
backlog = 8192

[limits]
max_connections = 100000
# The default 20 messages/s (burst 40) per connection would throttle the harness's senders.
rate = 1000000.0
burst = 1000000

[log]
level = "warning"
"""


class ServerError(Exception):
    """A server could not be started or probed; the message says why."""


@dataclass
class Sample:
    """CPU seconds and RSS bytes of the server(s), summed over nodes, at wall time ``t``.

    ``aux_cpu`` is the CPU of the processes the nodes depend on (the Redis the harness started,
    or ``--redis-pid``), kept apart so a figure can be given with and without it; None when
    there is none, or it cannot be read.
    """

    t: float
    cpu: float
    rss: int
    aux_cpu: float | None = None


class Probe:
    """Reads CPU and RSS of one or more server processes."""

    def sample(self) -> Sample:  # pragma: no cover - interface
        raise NotImplementedError


def proc_stat(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and RSS bytes of ``pid`` from ``/proc/<pid>/stat``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime, stime are fields 14 and 15 of stat(5); index 11, 12 after the comm.
        return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[21]) * PAGE
    except (OSError, ValueError, IndexError) as exc:
        raise ServerError(f"cannot read /proc/{pid}: {exc}") from None


class ProcProbe(Probe):
    """From ``/proc/<pid>``: the harness started the process, or ``--server-pid`` named it.

    Args:
        pids: the nodes (CPU and RSS are summed over them).
        aux_pids: what the nodes depend on (Redis): CPU reported apart, as ``aux_cpu``.
    """

    def __init__(self, pids: list[int], aux_pids: list[int] | None = None) -> None:
        self.pids = pids
        self.aux_pids = aux_pids or []

    def sample(self) -> Sample:
        cpu, rss = 0.0, 0
        for pid in self.pids:
            c, r = proc_stat(pid)
            cpu += c
            rss += r
        aux = sum(proc_stat(pid)[0] for pid in self.aux_pids) if self.aux_pids else None
        return Sample(time.time(), cpu, rss, aux)


class MetricsProbe(Probe):
    """From ``GET /metrics`` of each node (ws:// URL -> http://host:port/metrics)."""

    def __init__(self, urls: list[str], aux_pids: list[int] | None = None) -> None:
        self.aux_pids = aux_pids or []
        self.urls = []
        for url in urls:
            parts = urlsplit(url)
            scheme = "https" if parts.scheme == "wss" else "http"
            self.urls.append(f"{scheme}://{parts.netloc}/metrics")

    def sample(self) -> Sample:
        cpu, rss = 0.0, 0
        for url in self.urls:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    text = resp.read().decode()
            except (OSError, urllib.error.URLError) as exc:
                raise ServerError(f"cannot read {url}: {exc}") from None
            values = parse_metrics(text)
            if "process_cpu_seconds_total" not in values:
                raise ServerError(f"{url} has no process_cpu_seconds_total")
            cpu += values["process_cpu_seconds_total"]
            rss += int(values.get("process_resident_memory_bytes", 0))
        aux = sum(proc_stat(pid)[0] for pid in self.aux_pids) if self.aux_pids else None
        return Sample(time.time(), cpu, rss, aux)


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value.split()[0])
    return out


def _samples(urls: list[str], metric: str, label: str) -> list[tuple[str, float]] | None:
    """``(value of label, sample)`` for each sample of ``metric`` on each node's /metrics.

    None when a node's /metrics cannot be read: the figure is then simply not reported.
    """
    prefix, key = metric + "{", label + '="'
    out: list[tuple[str, float]] = []
    for url in MetricsProbe(urls).urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except (OSError, urllib.error.URLError):
            return None
        for line in text.splitlines():
            if line.startswith(prefix):
                labels, _, value = line.partition("} ")
                with contextlib.suppress(ValueError):
                    out.append((labels.split(key, 1)[-1].split('"', 1)[0], float(value)))
    return out


def close_counts(urls: list[str]) -> dict[str, int] | None:
    """Connections closed by the server(s), by close code (``chatd_closes_total{code=...}``)."""
    samples = _samples(urls, "chatd_closes_total", "code")
    if samples is None:
        return None
    total: dict[str, int] = {}
    for code, value in samples:
        total[code] = total.get(code, 0) + int(value)
    return total


def fanout_buckets(urls: list[str]) -> dict[float, float] | None:
    """chatd's ``chatd_fanout_seconds`` histogram (cumulative buckets), summed over the nodes.

    The time a node takes to hand one frame to every local recipient: the server's own part
    of a delivery's latency, without the client's or the scheduler's. None when a node has no
    such histogram (the ceiling) or its /metrics cannot be read.
    """
    total: dict[float, float] = {}
    for le, value in _samples(urls, "chatd_fanout_seconds_bucket", "le") or ():
        with contextlib.suppress(ValueError):
            bound = float(le)
            total[bound] = total.get(bound, 0.0) + value
    return total or None


def stop_all(procs: list[subprocess.Popen[bytes]], sig: int, timeout: float) -> None:
    """Signal every process, then wait for each, killing one that outlasts ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def free_port(host: str) -> int:
    """A TCP port free right now on ``host``; never 6379 (a shared Redis may live there)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port != 6379:
            return port


@dataclass
class Managed:
    """Server processes the harness started for one target (one or more nodes)."""

    name: str
    procs: list[subprocess.Popen[bytes]]
    urls: list[str]
    workdir: tempfile.TemporaryDirectory[str]
    secret: str = ""
    logs: list[Path] = field(default_factory=list)
    #: a server the nodes depend on, started for them (a private Redis); stopped after them.
    companion: Managed | None = None

    @property
    def probe(self) -> Probe:
        aux = self.companion.procs if self.companion is not None else []
        return ProcProbe([p.pid for p in self.procs], [p.pid for p in aux])

    def check_alive(self) -> None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                raise ServerError(
                    f"{self.name} (pid {proc.pid}) exited with {proc.returncode}: {tail(log)}"
                )

    def stop(self) -> None:
        stop_all(self.procs, signal.SIGTERM, timeout=15)
        if self.companion is not None:
            self.companion.stop()
        self.workdir.cleanup()


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def _wait_ready(m: Managed, deadline: float, path: str = "/healthz") -> None:
    """Poll ``path`` of every URL until 200 (chatd: ``/readyz``, so the backend is up too)."""
    for url in m.urls:
        parts = urlsplit(url)
        health = f"http://{parts.netloc}{path}"
        while True:
            m.check_alive()
            try:
                with urllib.request.urlopen(health, timeout=1) as resp:
                    if resp.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                m.stop()
                raise ServerError(f"{m.name} did not answer {health} within the start timeout")
            time.sleep(0.05)


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    env.update(extra)
    return env


def _redis_ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(timeout: float = 15.0) -> Managed:
    """A private ``redis-server`` for the nodes: a free port (never 6379), a temp directory, no
    persistence. Never a Redis someone else uses: the benchmark's keys and load stay its own.

    Raises:
        ServerError: redis-server is not installed, exited, or did not answer PING in time.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerError("redis-server is not on PATH (apt-get install redis-server), or give "
                          "--redis-url of a Redis you run for the benchmark")
    work = tempfile.TemporaryDirectory(prefix="redis-loadtest-")
    port = free_port("127.0.0.1")
    log = Path(work.name) / "redis.log"
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", work.name,
           "--logfile", str(log), "--daemonize", "no", "--protected-mode", "no",
           "--save", "", "--appendonly", "no", "--maxclients", "10000"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    m = Managed("redis", [proc], [f"redis://127.0.0.1:{port}/0"], work, logs=[log])
    deadline = time.monotonic() + timeout
    while not _redis_ping(port):
        try:
            m.check_alive()
        except ServerError:
            m.stop()
            raise
        if time.monotonic() > deadline:
            m.stop()
            raise ServerError(f"redis-server on port {port} did not answer PING in {timeout} s")
        time.sleep(0.02)
    return m


def start_chatd(host: str = "127.0.0.1", nodes: int = 1, redis_url: str = "",
                max_outbound: int | None = None, timeout: float = 30.0,
                private_redis: bool = False) -> Managed:
    """Start ``nodes`` chatd processes with a temp state dir, a fresh secret and BENCH_CONFIG.

    Args:
        redis_url: ``CHATD_REDIS_URL`` of the nodes (a Redis the caller runs).
        private_redis: start a private Redis (:func:`start_redis`) for the nodes instead; its
            CPU is then measured too (``Sample.aux_cpu``) and it is stopped with them.

    Raises:
        ServerError: a node exited or did not become healthy in ``timeout`` seconds.
    """
    companion = start_redis() if private_redis else None
    if companion is not None:
        redis_url = companion.urls[0]
    try:
        return _start_nodes(host, nodes, redis_url, max_outbound, timeout, companion)
    except BaseException:
        if companion is not None:
            companion.stop()
        raise


def _start_nodes(host: str, nodes: int, redis_url: str, max_outbound: int | None,
                 timeout: float, companion: Managed | None) -> Managed:
    work = tempfile.TemporaryDirectory(prefix="chatd-loadtest-")
    root = Path(work.name)
    config = root / "config.toml"
    text = BENCH_CONFIG
    if max_outbound is not None:
        text = text.replace("[limits]\n", f"[limits]\nmax_outbound_bytes = {max_outbound}\n")
    config.write_text(text)
    secret = secrets.token_urlsafe(32)
    procs, urls, logs = [], [], []
    for n in range(nodes):
        port = free_port(host)
        state = root / f"state-{n}"
        log = root / f"chatd-{n}.log"
        env = {"CHATD_JWT_SECRET": secret, "CHATD_NODE_ID": f"node-{n}"}
        if redis_url:
            env["CHATD_REDIS_URL"] = redis_url
        cmd = [sys.executable, "-m", "chatd", "serve", "--host", host, "--port", str(port),
               "--state-dir", str(state), "-c", str(config)]
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                          env=_env(env), start_new_session=True))
        urls.append(f"ws://{host}:{port}/ws")
        logs.append(log)
    m = Managed("chatd", procs, urls, work, secret, logs, companion)
    try:
        _wait_ready(m, time.monotonic() + timeout, "/readyz")
    except BaseException:
        m.stop()
        raise
    return m


def start_ceiling(host: str = "127.0.0.1", fanout: str = "broadcast",
                  max_outbound: int | None = None, timeout: float = 30.0) -> Managed:
    """Start the bare-broadcast reference server (:mod:`loadtest.ceiling`)."""
    work = tempfile.TemporaryDirectory(prefix="ceiling-loadtest-")
    port = free_port(host)
    log = Path(work.name) / "ceiling.log"
    cmd = [sys.executable, "-m", "loadtest.ceiling", "--host", host, "--port", str(port),
           "--fanout", fanout]
    if max_outbound is not None:
        cmd += ["--max-outbound", str(max_outbound)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env({}),
                                start_new_session=True)
    # The ceiling verifies nothing; any secret will do for the tokens the harness sends it.
    m = Managed("ceiling", [proc], [f"ws://{host}:{port}/ws"], work, secrets.token_urlsafe(32),
                [log])
    _wait_ready(m, time.monotonic() + timeout)
    return m
