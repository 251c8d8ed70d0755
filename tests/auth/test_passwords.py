"""argon2id hashing, the dummy hash for unknown users, and the bounded async service."""

from __future__ import annotations

import asyncio
import threading

import argon2
import pytest

from chatd.auth import passwords as passwords_mod
from chatd.auth.password_service import PasswordService
from chatd.auth.passwords import Passwords
from chatd.codes import CloseCode
from chatd.errors import AuthError, InvalidInput

CHEAP = {"memory_cost": 1024, "time_cost": 1}


def test_hashes_are_argon2id_with_at_least_the_owasp_minimum() -> None:
    p = Passwords()
    h = p.hash("correct horse")
    params = argon2.extract_parameters(h)
    assert h.startswith("$argon2id$")
    assert params.type is argon2.Type.ID
    assert params.memory_cost >= 19 * 1024 and params.time_cost >= 2 and params.parallelism >= 1
    assert p.verify(h, "correct horse")
    assert not p.verify(h, "wrong horse")
    assert not p.needs_rehash(h)


def test_the_same_password_hashes_differently_each_time() -> None:
    p = Passwords(**CHEAP)
    assert p.hash("pw") != p.hash("pw")


@pytest.mark.parametrize("stored", [None, "", "not-a-hash", "$argon2id$v=19$m=1,t=1,p=1$x$y"])
def test_unknown_users_and_corrupt_hashes_never_verify_and_never_raise(stored: str | None) -> None:
    assert not Passwords(**CHEAP).verify(stored, "pw")


def test_an_unknown_user_costs_a_real_verification_with_the_same_parameters() -> None:
    p = Passwords(**CHEAP)
    calls: list[str] = []
    real = p._hasher

    class Counting:
        def hash(self, password: str) -> str:
            return real.hash(password)

        def verify(self, hash_: str, password: str) -> bool:
            calls.append(hash_)
            return real.verify(hash_, password)

    p._hasher = Counting()  # type: ignore[assignment]
    assert not p.verify(None, "pw")
    assert not p.verify(p.hash("other"), "pw")
    assert len(calls) == 2
    dummy, real = (argon2.extract_parameters(h) for h in calls)
    assert dummy == real  # same cost: a stopwatch cannot tell the two answers apart


def test_over_long_and_non_string_passwords_are_refused_by_hash_and_fail_verify() -> None:
    p = Passwords(**CHEAP)
    h = p.hash("x")
    too_long = "x" * (passwords_mod.MAX_PASSWORD_CHARS + 1)
    with pytest.raises(InvalidInput):
        p.hash(too_long)
    with pytest.raises(InvalidInput):
        p.hash("")
    assert not p.verify(h, too_long)
    assert not p.verify(h, None)  # type: ignore[arg-type]


def test_a_hash_made_with_weaker_parameters_needs_a_rehash() -> None:
    weak = Passwords(**CHEAP).hash("pw")
    strong = Passwords(memory_cost=2048, time_cost=2)
    assert strong.verify(weak, "pw")  # still verifies
    assert strong.needs_rehash(weak)
    assert not strong.needs_rehash(strong.hash("pw"))
    assert strong.needs_rehash("garbage")


async def test_the_service_verifies_and_hashes_off_the_event_loop() -> None:
    service = PasswordService(2, Passwords(**CHEAP))
    try:
        h = await service.hash("pw")
        assert await service.verify(h, "pw")
        assert not await service.verify(h, "nope")
        assert not await service.verify(None, "pw")
        assert service.calls == 4
        with pytest.raises(InvalidInput):
            await service.hash("")
    finally:
        service.close()


class Gate(Passwords):
    """Passwords whose verify blocks until released, reporting how many run at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(**CHEAP)
        self.release = threading.Event()
        self.running = 0
        self.peak = 0
        self.count = 0
        self._lock = threading.Lock()
        self._loop = loop
        self.entered = asyncio.Queue[int]()

    def verify(self, stored_hash: str | None, password: str) -> bool:
        with self._lock:
            self.count += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
            self._loop.call_soon_threadsafe(self.entered.put_nowait, self.running)
        self.release.wait(timeout=30)
        with self._lock:
            self.running -= 1
        return False


async def test_the_service_runs_at_most_hash_concurrency_hashes_at_once() -> None:
    gate = Gate(asyncio.get_running_loop())
    service = PasswordService(2, gate)
    try:
        tasks = [asyncio.create_task(service.verify(None, "pw")) for _ in range(6)]
        async with asyncio.timeout(10):
            await gate.entered.get()
            await gate.entered.get()
        # Two are inside; give the others every chance to (wrongly) enter as well.
        for _ in range(20):
            await asyncio.sleep(0)
        assert gate.running == 2 and gate.entered.empty()
        gate.release.set()
        async with asyncio.timeout(10):
            assert await asyncio.gather(*tasks) == [False] * 6
        assert gate.peak == 2
    finally:
        gate.release.set()
        service.close()


async def test_a_full_queue_refuses_at_once_with_try_again_later() -> None:
    gate = Gate(asyncio.get_running_loop())
    service = PasswordService(1, gate, max_waiting=1)
    try:
        first = asyncio.create_task(service.verify(None, "pw"))
        async with asyncio.timeout(10):
            await gate.entered.get()
        second = asyncio.create_task(service.verify(None, "pw"))  # waits for the thread
        await asyncio.sleep(0)
        with pytest.raises(AuthError) as info:
            await service.verify(None, "pw")
        assert info.value.code == CloseCode.TRY_AGAIN_LATER
        gate.release.set()
        async with asyncio.timeout(10):
            assert await asyncio.gather(first, second) == [False, False]
    finally:
        gate.release.set()
        service.close()


async def test_logins_abandoned_while_waiting_never_cost_a_hash() -> None:
    gate = Gate(asyncio.get_running_loop())
    service = PasswordService(1, gate)
    try:
        first = asyncio.create_task(service.verify(None, "pw"))
        async with asyncio.timeout(10):
            await gate.entered.get()
        waiting = [asyncio.create_task(service.verify(None, "pw")) for _ in range(5)]
        await asyncio.sleep(0)
        for task in waiting:  # their clients went away
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        gate.release.set()
        async with asyncio.timeout(10):
            assert await first is False
            # One more call proves the pool is free and that nothing queued behind it ran.
            assert await service.verify(None, "pw") is False
        assert gate.peak == 1 and gate.count == 2
    finally:
        gate.release.set()
        service.close()
