"""Key rotation on a running ``chatd serve``: add a key, switch the signer, drop the old key,
each step applied with SIGHUP while a client stays connected."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from tests.client import Client
from tests.nodes import ChatdProcess


def keys_config(path: Path, kids: list[str], signer: str) -> None:
    blocks = [f'[[auth.keys]]\nkid = "{kid}"\nalg = "HS256"\nsecret_file = "{path.parent}/{kid}"\n'
              f'signing = {"true" if kid == signer else "false"}\n' for kid in kids]
    path.write_text("\n".join(blocks))


def token_cli(config: Path, state: Path, user: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    env["CHATD_STATE_DIR"] = str(state)
    return subprocess.run(
        [sys.executable, "-m", "chatd", "token", "issue", user, "-c", str(config)],
        env=env, capture_output=True, text=True, check=True).stdout.strip()


async def reloaded(proc: ChatdProcess, count: int, timeout: float = 10.0) -> None:
    """Wait until the log shows ``count`` successful reloads."""
    deadline = time.monotonic() + timeout
    while proc.log().count('"reloaded"') < count:
        assert time.monotonic() < deadline, proc.log()
        await asyncio.sleep(0.05)


async def test_keys_rotate_with_sighup_without_dropping_connections(tmp_path: Path) -> None:
    for kid in ("k1", "k2"):
        (tmp_path / kid).write_text(f"{kid}-" + "s" * 40)
        (tmp_path / kid).chmod(0o600)
    config = tmp_path / "chatd.toml"
    state = tmp_path / "state"
    keys_config(config, ["k1"], "k1")
    proc = ChatdProcess(state, config=config, env={"CHATD_JWT_SECRET": ""}).start()
    try:
        old_token = token_cli(config, state, "alice")
        assert jwt.get_unverified_header(old_token)["kid"] == "k1"
        alice = await Client.open(f"{proc.url}?token={old_token}")
        await alice.expect("welcome")

        keys_config(config, ["k1", "k2"], "k2")  # step 1+2: add k2 and sign with it
        proc.signal(signal.SIGHUP)
        await reloaded(proc, 1)
        new_token = token_cli(config, state, "bob")
        assert jwt.get_unverified_header(new_token)["kid"] == "k2"
        bob = await Client.open(f"{proc.url}?token={new_token}")
        await bob.expect("welcome")
        late_old = await Client.open(f"{proc.url}?token={old_token}")  # k1 still verifies
        await late_old.expect("welcome")

        keys_config(config, ["k2"], "k2")  # step 3: remove k1
        proc.signal(signal.SIGHUP)
        await reloaded(proc, 2)
        with pytest.raises(InvalidStatus) as refused:
            await Client.open(f"{proc.url}?token={old_token}")
        assert refused.value.response.status_code == 401
        # Connections made with the old key stay open; they renew in-band with the new key.
        assert (await alice.request("ping", "pong"))["type"] == "pong"
        renewed = await alice.request("auth", "tokens", token=token_cli(config, state, "alice"))
        assert renewed["type"] == "tokens"
    finally:
        await asyncio.to_thread(proc.stop)  # the loop must stay free to answer the close


async def test_a_broken_reload_keeps_the_running_keys(tmp_path: Path) -> None:
    (tmp_path / "k1").write_text("k1-" + "s" * 40)
    config = tmp_path / "chatd.toml"
    state = tmp_path / "state"
    keys_config(config, ["k1"], "k1")
    proc = ChatdProcess(state, config=config, env={"CHATD_JWT_SECRET": ""}).start()
    try:
        token = token_cli(config, state, "alice")
        alice = await Client.open(f"{proc.url}?token={token}")
        await alice.expect("welcome")
        config.write_text('[[auth.keys]]\nkid = "k9"\nsecret_file = "/nonexistent"\n')
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in proc.log():
            assert time.monotonic() < deadline, proc.log()
            await asyncio.sleep(0.05)
        assert "auth.keys[0]" in proc.log()
        assert (await alice.request("ping", "pong"))["type"] == "pong"
        again = await Client.open(f"{proc.url}?token={token}")
        await again.expect("welcome")
    finally:
        await asyncio.to_thread(proc.stop)  # the loop must stay free to answer the close
