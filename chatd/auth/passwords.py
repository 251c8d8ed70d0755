"""Password hashing with argon2id (argon2-cffi); synchronous and CPU-bound by design.

Parameters default to the OWASP minimum for argon2id (m = 19 MiB, t = 2, p = 1): about 20-40 ms
per hash on one core, which bounds what a login storm costs. Raising them later is safe: a hash
made with older parameters still verifies, and :meth:`Passwords.needs_rehash` tells the login
path to store a new one.

Timing: :meth:`Passwords.verify` with ``stored_hash=None`` (unknown user, or an account without a
password) verifies against a dummy hash made with the same parameters, so "no such user" and
"wrong password" cost the same and cannot be told apart by a stopwatch.

The event loop must never run these: :class:`chatd.auth.password_service.PasswordService` runs
them in a bounded thread pool (argon2-cffi releases the GIL while hashing).
"""

from __future__ import annotations

import secrets
import threading

import argon2
from argon2 import PasswordHasher, Type

from chatd.errors import InvalidInput

#: OWASP Password Storage Cheat Sheet, argon2id minimum: 19 MiB, 2 iterations, 1 lane.
MEMORY_COST_KIB = 19 * 1024
TIME_COST = 2
PARALLELISM = 1
#: Longer inputs are refused without hashing: nobody types 1 KiB, and it bounds the work.
MAX_PASSWORD_CHARS = 1024


class Passwords:
    """argon2id hashing, verification and rehash checks with one set of parameters.

    Args:
        memory_cost: KiB of memory per hash (at least the OWASP 19 MiB in production; tests of
            rehashing may pass less).
        time_cost: iterations.
        parallelism: lanes.
    """

    def __init__(
        self,
        *,
        memory_cost: int = MEMORY_COST_KIB,
        time_cost: int = TIME_COST,
        parallelism: int = PARALLELISM,
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._dummy: str | None = None
        self._dummy_lock = threading.Lock()

    def hash(self, password: str) -> str:
        """The PHC-format argon2id hash of ``password`` (salted).

        Raises:
            InvalidInput: empty, too long, or not a string.
        """
        if not isinstance(password, str) or not password:
            raise InvalidInput("password must be a non-empty string")
        if len(password) > MAX_PASSWORD_CHARS:
            raise InvalidInput(f"password must be at most {MAX_PASSWORD_CHARS} characters")
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when ``password`` matches ``stored_hash``; never raises for bad input.

        ``stored_hash=None`` verifies against a dummy hash and returns False, taking the same
        time as a real mismatch. A corrupt stored hash is a mismatch too.
        """
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
            password = ""  # still spend the time below: the answer must not be faster
        target = stored_hash if stored_hash else self._dummy_hash()
        try:
            ok = self._hasher.verify(target, password)
        except argon2.exceptions.VerifyMismatchError:
            return False
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
        return bool(ok) and bool(stored_hash) and bool(password)

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when ``stored_hash`` was made with other parameters (or another variant)."""
        try:
            return bool(self._hasher.check_needs_rehash(stored_hash))
        except (argon2.exceptions.InvalidHashError, ValueError):
            return True

    def _dummy_hash(self) -> str:
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = self._hasher.hash(secrets.token_urlsafe(24))
            return self._dummy

