"""The rooms policy is part of the sans-I/O core: the rules of tests/test_layers.py apply."""

from __future__ import annotations

import pytest

from tests.test_layers import CHATD, IO_MODULES, SHELL_MODULES, offenders

POLICY = [CHATD / "core" / "rooms.py", CHATD / "auth" / "room_tokens.py"]
ROOM_STORES = ("chatd.backends.memory.rooms", "chatd.backends.sqlite.rooms",
               "chatd.backends.redis.rooms")


@pytest.mark.parametrize("module", [*IO_MODULES, *SHELL_MODULES, *ROOM_STORES])
def test_the_rooms_policy_does_no_io_and_never_reaches_a_backend(module: str) -> None:
    assert all(p.is_file() for p in POLICY)
    assert offenders(POLICY, module) == []


def test_jwt_stays_in_chatd_auth() -> None:
    assert offenders([CHATD / "core" / "rooms.py"], "jwt") == []
    assert offenders([CHATD / "auth" / "room_tokens.py"], "jwt")  # the scanner sees it
