"""The refresh-token chain rule and the deny-entry key, shared by every State backend.

Pure functions, no I/O: the SQLite backend runs :func:`rotate` inside its write transaction, and
the Redis backend's rotation script (:mod:`chatd.backends.redis.state`) is the same rule in Lua,
both held to it by the contract suite (``tests/backends/test_contract.py``).

The rule (docs/security.md, "Refresh tokens"):

- a *working* token (``refresh_hash`` or one of ``live``) rotates: it becomes spent, the new
  token becomes ``refresh_hash``, the other working tokens stay working;
- a *spent* token presented within ``grace`` seconds of its own rotation forks a branch: the
  new token is added and every working token stays working. Two browser tabs that shared one
  token, or a client that lost the answer, thus each end up with a working token; the window
  is measured from the first rotation, so re-presenting cannot stretch it;
- a spent token presented later is reuse (the caller revokes the session);
- anything else (a hash this session never issued, or one older than the last
  :data:`MAX_SPENT` rotations) is unknown: refused, with no side effect, so a forged
  ``<sid>.<anything>`` cannot log anyone out.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from chatd.backends.base import RefreshUpdate, RotateOutcome, SessionRecord

#: Working tokens per session at most (forks beyond it drop the oldest branch).
MAX_BRANCHES = 4
#: Spent tokens remembered per session: reuse of an older one is only an invalid token.
MAX_SPENT = 64


def rotate(record: SessionRecord, presented: str, update: RefreshUpdate,
           grace: float) -> tuple[RotateOutcome, SessionRecord]:
    """Apply the chain rule; returns the outcome and the record to store (unchanged unless
    ``ROTATED``). Expiry is the caller's check."""
    working = (record.refresh_hash, *record.live)
    if presented in working:
        others = tuple(h for h in working if h != presented)[: MAX_BRANCHES - 1]
        spent = ((presented, update.rotated_at), *record.spent)[:MAX_SPENT]
        return RotateOutcome.ROTATED, replace(
            record, refresh_hash=update.new_hash, live=others, spent=spent,
            rotated_at=update.rotated_at, refreshes_today=update.refreshes_today, day=update.day)
    for h, rotated_at in record.spent:
        if h != presented:
            continue
        if grace > 0 and update.rotated_at - rotated_at <= grace:
            return RotateOutcome.ROTATED, replace(
                record, refresh_hash=update.new_hash, live=working[: MAX_BRANCHES - 1],
                refreshes_today=update.refreshes_today, day=update.day)
        return RotateOutcome.REUSED, record
    return RotateOutcome.UNKNOWN, record


def encode_live(live: tuple[str, ...]) -> str:
    """Stored form of ``live``: hashes separated by spaces (hex never contains one)."""
    return " ".join(live)


def decode_live(raw: str | None) -> tuple[str, ...]:
    return tuple(raw.split()) if raw else ()


def encode_spent(spent: tuple[tuple[str, float], ...]) -> str:
    """Stored form of ``spent``: ``hash@rotated_at`` entries separated by spaces."""
    return " ".join(f"{h}@{t!r}" for h, t in spent)


def decode_spent(raw: str | None) -> tuple[tuple[str, float], ...]:
    if not raw:
        return ()
    out = []
    for entry in raw.split():
        h, _, t = entry.partition("@")
        out.append((h, float(t or "0")))
    return tuple(out)


def jti_key(jti: str, issuer: str | None, user: str | None) -> str:
    """The deny-list key of a token id.

    Scoped to issuer and subject when ``user`` is given: ``~`` and a SHA-256 of the three, so
    another issuer's token that reuses the ``jti`` is not refused, and issuer strings of any
    length make a bounded key. ``~`` never starts a valid ``jti``. Unscoped: the ``jti`` itself.
    """
    if user is None:
        return jti
    digest = hashlib.sha256("\0".join((issuer or "", user, jti)).encode()).hexdigest()
    return f"~{digest}"
