"""Login throttling: a sliding window of attempts per user name and per client address.

Why both: per user name stops guessing one account's password from many addresses; per address
stops one client spraying many accounts. An attempt counts from the moment it starts (so a burst
of concurrent guesses cannot all slip in before the first one fails); a *successful* login then
takes its attempt back from the address and clears the user name's window, so legitimate
traffic (a load test logging in a thousand users from one address) is never throttled, while
failures stay counted for ``auth.login_window``.

A throttled attempt is refused before any password is hashed: throttling must be cheaper than
the attack. IPv6 addresses count per /64, the block one subscriber usually holds.

The windows live in this node's memory (bounded to ``max_keys`` names and addresses, least
recently used evicted first); with several nodes an attacker gets each node's allowance.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class _Windows:
    """Timestamps of recent attempts per key, bounded in keys and in entries per key."""

    def __init__(self, max_keys: int) -> None:
        self._max_keys = max_keys
        self._data: OrderedDict[str, deque[float]] = OrderedDict()

    def count(self, key: str, since: float) -> int:
        q = self._data.get(key)
        if q is None:
            return 0
        while q and q[0] <= since:
            q.popleft()
        if not q:
            del self._data[key]
            return 0
        return len(q)

    def add(self, key: str, now: float) -> None:
        q = self._data.get(key)
        if q is None:
            q = self._data[key] = deque()
            if len(self._data) > self._max_keys:
                self._data.popitem(last=False)
        else:
            self._data.move_to_end(key)
        q.append(now)

    def take_back(self, key: str) -> None:
        q = self._data.get(key)
        if q:
            q.pop()
            if not q:
                del self._data[key]

    def clear(self, key: str) -> None:
        self._data.pop(key, None)


def address_key(address: str) -> str:
    """The throttling key of a client address: IPv4 as is, IPv6 by /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginThrottle:
    """Sliding-window login throttle (see the module docstring).

    Limits are passed on each call so a reloaded configuration applies at once; a limit of 0
    or less means unlimited.

    Args:
        clock: unix seconds (injectable).
        max_keys: names (and, separately, addresses) remembered at most.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._users = _Windows(max_keys)
        self._addresses = _Windows(max_keys)

    def try_begin(
        self, user: str, address: str, *, per_user: int, per_address: int, window: float
    ) -> bool:
        """Count one attempt and return True; False (nothing counted) when over a limit."""
        now = self._clock()
        since = now - window
        addr = address_key(address)
        user_key = user[:128]
        if per_user > 0 and self._users.count(user_key, since) >= per_user:
            return False
        if per_address > 0 and self._addresses.count(addr, since) >= per_address:
            return False
        self._users.add(user_key, now)
        self._addresses.add(addr, now)
        return True

    def succeeded(self, user: str, address: str) -> None:
        """The attempt begun for ``user`` from ``address`` was a successful login."""
        self._users.clear(user[:128])
        self._addresses.take_back(address_key(address))

