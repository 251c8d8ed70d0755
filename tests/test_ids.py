"""chatd.ids: message ids ``"<ms>-<seq>"``, strictly increasing, compared as numbers."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.ids import IdClock, id_key
from chatd.protocol import MSG_ID_RE


def test_the_first_id_is_the_clock_with_sequence_zero() -> None:
    assert IdClock().next(1767225600123) == "1767225600123-0"


def test_ids_in_the_same_millisecond_count_up() -> None:
    clock = IdClock()
    assert [clock.next(1000) for _ in range(3)] == ["1000-0", "1000-1", "1000-2"]


def test_a_new_millisecond_restarts_the_sequence() -> None:
    clock = IdClock()
    clock.next(1000)
    clock.next(1000)
    assert clock.next(1001) == "1001-0"


def test_ids_keep_increasing_when_the_clock_steps_back() -> None:
    clock = IdClock()
    first = clock.next(5000)
    back = clock.next(4000)
    further_back = clock.next(1)
    assert (first, back, further_back) == ("5000-0", "5000-1", "5000-2")
    assert clock.next(5000) == "5000-3"
    assert clock.next(5001) == "5001-0"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**48), min_size=1, max_size=60))
def test_ids_are_strictly_increasing_whatever_the_clock_does(times: list[int]) -> None:
    clock = IdClock()
    ids = [clock.next(t) for t in times]
    keys = [id_key(i) for i in ids]
    assert all(a < b for a, b in itertools.pairwise(keys))
    assert all(MSG_ID_RE.match(i) for i in ids)
    # The millisecond part never runs ahead of the latest clock reading seen so far.
    assert all(k[0] <= max(times[: n + 1]) for n, k in enumerate(keys))


def test_id_key_is_a_pair_of_integers() -> None:
    assert id_key("1767225600123-42") == (1767225600123, 42)
    assert id_key("7") == (7, 0)


def test_id_key_orders_numerically_not_as_text() -> None:
    assert id_key("9-0") < id_key("10-0")
    assert id_key("5-9") < id_key("5-10")
    assert id_key("5-99") < id_key("6-0")
    assert id_key("5-0") == id_key("5-0")
    ids = ["10-0", "9-10", "9-2", "100-0", "9-0", "10-1"]
    assert sorted(ids, key=id_key) == ["9-0", "9-2", "9-10", "10-0", "10-1", "100-0"]
    assert sorted(ids) != sorted(ids, key=id_key)  # text order would be wrong
