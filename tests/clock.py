"""A clock the test moves by hand, for expiry and rate tests that must not sleep."""

from __future__ import annotations

import time


class Clock:
    """Callable like ``time.time``; starts at ``now`` (default: the real time) and only moves
    when the test calls :meth:`advance`."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
