"""``chatd serve`` as a real process, started the way the README says, driven by a real client."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import orjson

from tests.client import Client
from tests.nodes import ChatdProcess, free_port


def fresh_env(home: Path, port: int) -> dict[str, str]:
    """A user with nothing configured: no secret, no config, only a home directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATD_", "XDG_"))}
    env.update(HOME=str(home), CHATD_PORT=str(port))
    return env


async def test_fresh_install_serves_with_a_generated_secret_and_cli_tokens(
        tmp_path: Path) -> None:
    port = free_port()
    env = fresh_env(tmp_path, port)
    proc = ChatdProcess(tmp_path / "unused", port=port)
    proc.env = env
    proc.argv = lambda: [sys.executable, "-m", "chatd", "serve"]  # type: ignore[method-assign]
    proc.start()
    try:
        secret = tmp_path / ".local" / "state" / "chatd" / "jwt-secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        lines = [orjson.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
        assert any("secret" in line["event"] and line.get("path") == str(secret)
                   for line in lines)
        token = subprocess.run([sys.executable, "-m", "chatd", "token", "issue", "alice"],
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        assert token.count(".") == 2
        assert token not in proc.log()

        c = await Client.open(f"ws://127.0.0.1:{port}/ws?token={token}")
        assert (await c.recv())["user"] == "alice"
        await c.send(type="join", room="general")
        await c.expect("joined")
        await c.send(type="send", room="general", text="hi")
        assert (await c.expect("message"))["text"] == "hi"

        proc.signal(signal.SIGTERM)
        assert (await c.closed())[0] == 1001
        assert proc.wait() == 0
        assert token not in proc.log()
    finally:
        proc.kill()


def test_serve_with_a_broken_config_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_frame_bytes = 'big'\n")
    result = subprocess.run([sys.executable, "-m", "chatd", "serve", "-c", str(bad)],
                            env=fresh_env(tmp_path, free_port()), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "limits.max_frame_bytes" in result.stderr
    assert "Traceback" not in result.stderr
