"""Running chatd for tests: in-process nodes and real ``chatd serve`` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatd import config as config_module
from chatd.auth.keys import KeyRing
from chatd.config import Config
from chatd.server import Node

SECRET = "test-secret-0123456789-0123456789-abcdef"
ROOT = Path(__file__).resolve().parent.parent


def make_config(state_dir: Path, **sections: Mapping[str, Any]) -> Config:
    """A config on 127.0.0.1 port 0 with a fixed secret; ``sections`` override table values."""
    overrides: dict[str, dict[str, Any]] = {"server": {"port": 0, "state_dir": str(state_dir),
                                                       "node_id": "test"}}
    for name, table in sections.items():
        overrides.setdefault(name, {}).update(table)
    return config_module.load(None, env={"CHATD_JWT_SECRET": SECRET}, overrides=overrides)


async def start_node(config: Config) -> Node:
    from chatd.app import build_node

    keyring, _ = KeyRing.from_config(config, env={})
    node = build_node(config, keyring)
    await node.start()
    return node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class ChatdProcess:
    """``chatd serve`` as a child process, the way an operator runs it."""

    def __init__(self, state_dir: Path, *, port: int | None = None,
                 env: Mapping[str, str] | None = None, config: Path | None = None,
                 node_id: str | None = None) -> None:
        self.state_dir = state_dir
        self.port = port or free_port()
        self.config = config
        self.node_id = node_id or f"node-{self.port}"
        self.env = {**os.environ, "CHATD_JWT_SECRET": SECRET, "CHATD_LOG_LEVEL": "info",
                    **(env or {})}
        self.env.pop("CHATD_CONFIG", None)
        self.log_path = state_dir / f"chatd-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "chatd", "serve", "--port", str(self.port),
                "--state-dir", str(self.state_dir), "--node-id", self.node_id]
        if self.config is not None:
            argv += ["-c", str(self.config)]
        return argv

    def start(self, wait: bool = True, **popen: Any) -> ChatdProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.argv(), env=self.env, stdout=log, stderr=log,
                                     cwd=ROOT, **popen)
        log.close()
        if wait:
            self.wait_http("/healthz", 200)
        return self

    def status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.http + path, timeout=1) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def wait_http(self, path: str, status: int, timeout: float = 15.0) -> None:
        """Poll an HTTP endpoint until it answers ``status`` (a deadline, not a sleep)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"chatd exited with {self.proc.returncode}:\n{self.log()}")
            if self.status(path) == status:
                return
            time.sleep(0.05)
        raise AssertionError(f"{path} never answered {status}:\n{self.log()}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def issue(user: str, ttl: float = 900, *, issued_at: float | None = None, **kwargs: Any) -> str:
    """A token signed with the test secret (the keys a ChatdProcess or test node uses).

    ``issued_at`` (unix seconds) back-dates it, for tokens that are already expired.
    """
    from chatd.auth.tokens import TokenIssuer

    config = config_module.load(None, env={"CHATD_JWT_SECRET": SECRET})
    keyring, _ = KeyRing.from_config(config, env={})
    clock = time.time if issued_at is None else (lambda: issued_at)
    token, _ = TokenIssuer(keyring, clock=clock).issue(user, ttl, **kwargs)
    return token
