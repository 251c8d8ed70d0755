"""Access tokens for the harness: minted here with pyjwt, like any third-party client would.

The harness is a client of the protocol, so it does not import ``chatd``: it signs HS256 tokens
with the claims the contract requires (``sub``, ``iat``, ``exp``, ``jti``, header ``typ: JWT``)
from the same secret chatd verifies with. The secret comes, in order, from ``--secret``,
``$CHATD_JWT_SECRET``, or the file chatd generates on first run, ``<state_dir>/jwt-secret``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import jwt

SECRET_FILE_NAME = "jwt-secret"


class SecretError(Exception):
    """No usable signing secret; the message says where the harness looked."""


def find_secret(
    secret: str | None, state_dir: str | None, env: Mapping[str, str] | None = None
) -> str:
    """The HS256 secret to sign with.

    Raises:
        SecretError: none found, or the state dir file cannot be read.
    """
    env = os.environ if env is None else env
    if secret:
        return secret
    if env.get("CHATD_JWT_SECRET"):
        return env["CHATD_JWT_SECRET"]
    if state_dir:
        path = Path(state_dir) / SECRET_FILE_NAME
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretError(f"cannot read {path}: {exc.strerror}") from None
        if text:
            return text
        raise SecretError(f"{path} is empty")
    raise SecretError(
        "no signing secret: pass --secret, set CHATD_JWT_SECRET, or --state-dir of the chatd node "
        "(or let the harness start the server with --start-server)"
    )


def mint(secret: str, user: str, ttl: float = 7200.0, now: float | None = None) -> str:
    """An HS256 access token for ``user`` valid for ``ttl`` seconds (outlives a benchmark)."""
    issued = int(time.time() if now is None else now)
    claims = {"sub": user, "iat": issued, "exp": issued + int(ttl), "jti": uuid.uuid4().hex}
    return jwt.encode(claims, secret, algorithm="HS256", headers={"typ": "JWT"})
