"""The two systemd protocols a daemon speaks, without a third-party package.

* **sd_notify** (``man sd_notify``): newline-separated ``KEY=VALUE`` fields in one datagram to the
  ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
  namespace). With ``Type=notify`` systemd considers the service started only at ``READY=1``, so
  ``systemctl start`` and units ordered after chatd wait until the port really accepts.
* **Socket activation** (``man sd_listen_fds``): systemd passes listening sockets as fds 3, 4, ...
  with ``$LISTEN_FDS`` (how many) and ``$LISTEN_PID`` (for whom). The socket outlives restarts of
  the service, so during a restart the kernel queues connection attempts instead of refusing them.

``chatd.config`` is the only module that reads the environment for *settings*; the variables read
here are systemd's protocol, set per process by the service manager, so they are the documented
exception. Every function takes the environment as an optional mapping so tests can pass their own.

Both protocols are small and stable (``sd_notify(3)``, ``sd_listen_fds(3)``), so a dependency
would cost more than these lines; nothing here raises on a notify socket error, since a daemon must
not die because its supervisor went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping

from chatd.errors import ConfigError

#: The first fd passed by socket activation (SD_LISTEN_FDS_START): 0-2 are stdio.
LISTEN_FDS_START = 3


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends state changes to the service manager; a no-op when ``$NOTIFY_SOCKET`` is unset.

    Args:
        env: the environment (default ``os.environ``).
        timeout: longest a send may block (systemd reads promptly; this only bounds a stuck one).
        monotonic_usec: ``CLOCK_MONOTONIC`` in microseconds, for ``MONOTONIC_USEC=``.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, timeout: float = 0.5,
                 monotonic_usec: Callable[[], int] = _monotonic_usec) -> None:
        env = os.environ if env is None else env
        self._monotonic_usec = monotonic_usec
        addr = env.get("NOTIFY_SOCKET", "")
        # Only path and abstract addresses: systemd 254+ also knows vsock:, which a VM guest
        # talking to its host would need, not a service on the VM.
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        if not addr.startswith(("/", "@")):
            self.address = ""
        self._timeout = timeout
        self._watchdog = _watchdog_interval(env) if self.address else None

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to talk to."""
        return bool(self.address)

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half of ``WatchdogSec=``, or None when unset.

        Half, as ``sd_watchdog_enabled(3)`` advises, so one late ping does not kill the service.
        """
        return self._watchdog

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"KEY=VALUE"``) in one datagram; True when it was sent."""
        if not self.address:
            return False
        data = "\n".join(fields).encode()
        # A socket per message, as libsystemd does: a few a minute cost nothing, and there is
        # no long-lived fd to close or to leak into children.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(self._timeout)
                sock.sendto(data, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup finished (or a reload did): the service accepts connections."""
        return self.notify("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(*_status(text))

    def reloading(self, status: str | None = None) -> bool:
        """A reload began; must be followed by :meth:`ready` when it ends (applied or refused).

        ``MONOTONIC_USEC`` is required by ``Type=notify-reload`` (systemd 253+) and harmless
        with ``Type=notify``, so the unit can move to notify-reload without a code change.
        """
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_usec()}",
                           *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began (draining): ``systemctl status`` shows "deactivating"."""
        return self.notify("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        """Still alive: sent by a task on the event loop, so a blocked loop misses it."""
        return self.notify("WATCHDOG=1")


def _status(text: str | None) -> tuple[str, ...]:
    # A newline would start a new KEY=VALUE field: keep STATUS to one line.
    return () if text is None else ("STATUS=" + " ".join(text.splitlines()),)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None  # WATCHDOG_PID names another process: the variable leaked to a child
    return usec / 2e6


async def heartbeat(notifier: Notifier, status: Callable[[], str], every: float = 5.0) -> None:
    """Until cancelled: ``WATCHDOG=1`` each half watchdog interval, ``STATUS=`` when it changes.

    Run it as a task on the serving loop; if the loop stalls, pings stop and systemd restarts
    the service after ``WatchdogSec=`` (``Restart=on-failure`` covers ``watchdog``).

    Args:
        notifier: where to send.
        status: the current status line (e.g. ``"1234 connections"``), cheap to compute.
        every: status refresh period in seconds when there is no (shorter) watchdog interval.
    """
    if not notifier.enabled:
        return
    wd = notifier.watchdog_interval()
    period = min(every, wd) if wd else every
    last = None
    while True:
        # First wait: the caller has just announced itself (READY=1 with its STATUS=).
        await asyncio.sleep(period)  # a period, not a synchronisation
        text = status()
        fields: tuple[str, ...] = ("WATCHDOG=1",) if wd else ()
        if text != last:
            fields += _status(text)
            last = text
        if fields:
            notifier.notify(*fields)


def listen_sockets(env: Mapping[str, str] | None = None, *,
                   unset_environment: bool = True) -> list[socket.socket]:
    """The listening sockets systemd passed, in ``ListenStream=`` order; [] when not activated.

    Args:
        env: the environment (default ``os.environ``).
        unset_environment: remove ``LISTEN_*`` from a mutable ``env`` so children do not
            believe the fds are theirs (``sd_listen_fds(1)``).

    Raises:
        ConfigError: a passed fd is not a listening stream socket (``ListenDatagram=``,
            ``ListenFIFO=`` or ``Accept=yes`` in the socket unit).
    """
    env = os.environ if env is None else env
    pid, fds = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if unset_environment and isinstance(env, MutableMapping):
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if pid != str(os.getpid()) or not fds.isdigit():
        return []  # not for us (inherited from a parent that was activated) or not activated
    socks: list[socket.socket] = []
    try:
        for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(fds)):
            socks.append(_listening_socket(fd))
    except ConfigError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _listening_socket(fd: int) -> socket.socket:
    try:
        os.set_inheritable(fd, False)  # systemd passes them without FD_CLOEXEC
        sock = socket.socket(fileno=fd)  # family and type are read from the fd
    except OSError as exc:
        raise ConfigError("LISTEN_FDS", f"fd {fd} is not a socket: {exc.strerror}") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.close()
        raise ConfigError("LISTEN_FDS", f"fd {fd} is not a listening stream socket "
                          "(the socket unit needs ListenStream= and Accept=no)")
    return sock


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; return the resulting (soft, hard).

    Each connection is one fd. Outside the unit (a shell, a container, a unit without
    ``LimitNOFILE=``) the soft limit is usually 1024 under a hard limit of 524288 or more: the low
    soft limit protects programs using select(), and an asyncio server on epoll is not one.
    Failure leaves the limit unchanged.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # Refused e.g. on macOS, where an unlimited hard limit cannot be the soft one.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
