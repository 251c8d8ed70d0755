"""Token buckets per key (a client address), in bounded memory. No I/O.

Used for the per-address accept rate limit (``server.accept_rate_per_address`` and
``server.accept_burst_per_address``): a connection storm from one address gets HTTP 429 before
the upgrade, so it never costs a token verification, a session or a socket past the handshake.

Why memory stays bounded: a bucket that has refilled to ``burst`` carries no information (a new
bucket would start full too), so it is forgotten. Buckets are kept in least-recently-used order,
and every call first drops the idle buckets at the old end, so an address costs memory only while
it is actually spending its allowance. On top of that at most ``max_keys`` buckets are kept: past
that the least recently used one is dropped even if it is not full, which forgives that address
a little (it gets a fresh full bucket) — the failure mode errs on letting clients in, and needs
more distinct addresses than ``max_keys`` at once, when a per-address limit no longer means much.

Rate and burst are passed on each call (like :class:`chatd.auth.throttle.LoginThrottle`), so a
reloaded configuration applies at once; a rate of 0 or less means unlimited.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class _Bucket:
    __slots__ = ("last", "tokens")

    def __init__(self, tokens: float, last: float) -> None:
        self.tokens = tokens
        self.last = last


class KeyedTokenBuckets:
    """One token bucket per key: ``rate`` tokens per second, at most ``burst`` saved up.

    Args:
        max_keys: buckets kept at most (least recently used dropped first).
        clock: monotonic seconds (injectable, so tests do not sleep).
    """

    def __init__(self, *, max_keys: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str, *, rate: float, burst: int) -> float:
        """Spend one token of ``key``'s bucket.

        Returns:
            0.0 when a token was spent (the caller may proceed), else the seconds until the
            next token (nothing is spent: a refused attempt does not push the wait further
            out, so a client that honours ``Retry-After`` gets in).
        """
        if rate <= 0:
            return 0.0
        now = self._clock()
        burst_f = float(max(burst, 1))
        self._sweep(now, rate, burst_f)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(burst_f, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            # Clocks only move forward; a bucket never holds more than the current burst
            # (which a reload may have lowered).
            elapsed = max(0.0, now - bucket.last)
            bucket.tokens = min(burst_f, bucket.tokens + elapsed * rate)
            bucket.last = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate

    def _sweep(self, now: float, rate: float, burst: float) -> None:
        """Forget buckets at the least-recently-used end that have refilled completely."""
        buckets = self._buckets
        while buckets:
            key, bucket = next(iter(buckets.items()))
            if bucket.tokens + (now - bucket.last) * rate < burst:
                # The oldest is still spending; anything newer was touched later, stop here.
                return
            del buckets[key]

    def __len__(self) -> int:
        """Buckets currently held (for tests and metrics)."""
        return len(self._buckets)
