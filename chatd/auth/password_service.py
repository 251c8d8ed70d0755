"""Password hashing off the event loop, with bounded concurrency.

argon2id is deliberately slow (tens of milliseconds of CPU and 19 MiB of memory per call). Run
on the event loop it would stall every connection; run without a bound, a login storm would
take every core and all memory. So each call runs in a dedicated thread pool of
``auth.hash_concurrency`` threads (argon2-cffi releases the GIL), and at most ``max_waiting``
calls may queue behind them; beyond that a login is refused at once with close code 1013
("try again later") instead of queueing without bound.

This is the one module of :mod:`chatd.auth` that imports asyncio: the rules stay in
:mod:`chatd.auth.passwords`, and this is only the thin async shell around them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from chatd.auth.passwords import Passwords
from chatd.codes import CloseCode
from chatd.errors import AuthError, InvalidInput

T = TypeVar("T")

#: Calls allowed to wait for a hashing thread, per thread.
WAITING_PER_THREAD = 64


class PasswordService:
    """Async ``hash`` / ``verify`` running :class:`Passwords` in a bounded thread pool.

    Args:
        concurrency: hashing threads (``auth.hash_concurrency``).
        passwords: the hashing rules and parameters (default: the OWASP minimum).
        max_waiting: calls that may wait for a thread before new ones are refused
            (default ``64 * concurrency``).
    """

    def __init__(
        self,
        concurrency: int = 2,
        passwords: Passwords | None = None,
        *,
        max_waiting: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise InvalidInput("concurrency must be >= 1")
        self.passwords = passwords or Passwords()
        self.concurrency = concurrency
        self.max_waiting = WAITING_PER_THREAD * concurrency if max_waiting is None else max_waiting
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0
        #: Hashing calls made so far (tests use it to prove throttled logins never hash).
        self.calls = 0

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """:meth:`Passwords.verify` in the pool (``None`` hash: dummy verify, False)."""
        return await self._run(self.passwords.verify, stored_hash, password)

    async def hash(self, password: str) -> str:
        """:meth:`Passwords.hash` in the pool; InvalidInput for an empty or too long password."""
        return await self._run(self.passwords.hash, password)

    def needs_rehash(self, stored_hash: str) -> bool:
        """Cheap (parses the hash's parameters): runs inline."""
        return self.passwords.needs_rehash(stored_hash)

    def close(self) -> None:
        """Release the threads (idempotent); running calls finish first."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pending >= self.concurrency + self.max_waiting:
            raise AuthError("server busy, try again later", code=CloseCode.TRY_AGAIN_LATER)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="chatd-argon2"
            )
        self._pending += 1
        try:
            self.calls += 1
            # The pool's size is the bound; a caller cancelled while queued (its client went
            # away) cancels its pool job too, so abandoned logins cost no hashing.
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._pending -= 1
