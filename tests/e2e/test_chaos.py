"""Chaos: 3 nodes, one Redis, 150 resuming clients, nodes and Redis killed and paused under traffic.

The short CI version of ``python -m tests.e2e.chaos`` (see that module and docs/reliability.md).
Each run ends with the invariants of :mod:`tests.e2e.chaos_invariants`; the first tests here
show that the checker does catch each kind of violation, so a run that "held" means something.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.e2e.chaos import Chaos, ChaosClient, Cluster, Settings
from tests.e2e.chaos_invariants import Send, View, check

CI = Settings(clients=150, rooms=6, rooms_per_client=2, send_interval=2.0)
#: Acknowledged sends between two faults: the cluster carries traffic again before the next.
BETWEEN = 150

# -- the checker catches what it must -------------------------------------------------------


def view(*ids: str, told_before: int | None = None) -> View:
    v = View()
    for i, msg_id in enumerate(ids):
        if told_before == i:
            v.told()
        v.add(msg_id)
    return v


def acked(*ids: str, room: str = "r", issued: float = 1.0) -> list[Send]:
    return [Send(0, room, f"t{i}", issued, "acked", i) for i in ids]


def history(*ids: str) -> dict[str, list[tuple[str, str]]]:
    return {"r": [(i, f"t{i}") for i in ids]}


def test_a_complete_view_passes_and_a_silent_gap_is_caught() -> None:
    sends = acked("1-0", "2-0", "3-0")
    assert check(history("1-0", "2-0", "3-0"), sends, {(1, "r"): view("1-0", "2-0", "3-0")},
                 aof=True).held
    report = check(history("1-0", "2-0", "3-0"), sends, {(1, "r"): view("1-0", "3-0")},
                   aof=True)
    assert report.violations == ["client 1 in r: silent gap of 1 message(s) after 1-0, "
                                 "before 3-0"]


def test_a_hole_is_excused_by_recovered_false_only_without_persistence_and_only_there() -> None:
    sends = acked("1-0", "2-0", "3-0", "4-0")
    final = history("1-0", "2-0", "3-0", "4-0")
    told_at_the_hole = view("1-0", "3-0", "4-0", told_before=1)
    assert check(final, sends, {(1, "r"): told_at_the_hole}, aof=False).held
    assert not check(final, sends, {(1, "r"): told_at_the_hole}, aof=True).held
    told_elsewhere = view("1-0", "3-0", "4-0", told_before=2)
    assert not check(final, sends, {(1, "r"): told_elsewhere}, aof=False).held


def test_a_message_missed_at_the_end_is_a_gap() -> None:
    sends = acked("1-0", "2-0")
    report = check(history("1-0", "2-0"), sends, {(1, "r"): view("1-0")}, aof=True)
    assert report.violations == ["client 1 in r: silent gap of 1 message(s) after 1-0, "
                                 "before the end"]


def test_a_repeat_or_a_reordering_is_caught() -> None:
    sends = acked("1-0", "2-0", "3-0")
    final = history("1-0", "2-0", "3-0")
    assert not check(final, sends, {(1, "r"): view("1-0", "2-0", "2-0", "3-0")}, aof=True).held
    assert not check(final, sends, {(1, "r"): view("1-0", "3-0", "2-0")}, aof=True).held


def test_acknowledged_but_not_stored_is_caught_unless_redis_lost_it_without_persistence() -> None:
    sends = acked("1-0", "2-0", issued=1.0)
    final = history("1-0")
    views = {(1, "r"): view("1-0", "2-0")}
    report = check(final, sends, views, aof=True)
    assert "r: acknowledged 2-0 't2-0' is missing from the history" in report.violations
    # Without persistence, a Redis restart at t=5 loses what was acknowledged before it.
    assert check(final, sends, views, aof=False, data_lost_at=[5.0]).held
    late = acked("1-0", "2-0", issued=9.0)
    assert not check(final, late, views, aof=False, data_lost_at=[5.0]).held


def test_stored_twice_or_under_another_id_or_after_a_refusal_is_caught() -> None:
    sends = acked("1-0", "2-0")
    assert not check({"r": [("1-0", "t1-0"), ("2-0", "t2-0"), ("3-0", "t2-0")]}, sends,
                     {}, aof=True).held
    assert not check({"r": [("1-0", "t1-0"), ("5-0", "t2-0")]}, sends, {}, aof=True).held
    refused = [*sends, Send(0, "r", "t3", 1.0, "rate_limited")]
    assert not check({"r": [("1-0", "t1-0"), ("2-0", "t2-0"), ("3-0", "t3")]}, refused, {},
                     aof=True).held
    unknown = [*sends, Send(0, "r", "t3", 1.0, "unknown"), Send(0, "r", "t4", 1.0, "unavailable")]
    report = check({"r": [("1-0", "t1-0"), ("2-0", "t2-0"), ("3-0", "t3"), ("4-0", "t4")]},
                   unknown, {}, aof=True)
    assert report.held
    assert report.figures["stored although answered unavailable"] == 1


# -- the runs -----------------------------------------------------------------------------------


async def run(tmp_path: Path, *, aof: bool, steps: list[str]) -> dict[str, object]:
    """Run the CI workload through ``steps``; after each, wait until traffic flows again.

    Steps: ``node`` (SIGKILL node 0 and restart it), ``two nodes`` (nodes 1 and 2 at once),
    ``redis restart`` (SIGKILL, start again), ``pause`` (SIGSTOP until every node is not ready,
    plus 2 s: the nodes restart their feeds), ``short pause`` (SIGSTOP only until not ready),
    ``drop`` (a fifth of the clients go offline) and ``back`` (they return and resume).
    """
    cluster = Cluster(tmp_path, 3, aof=aof)
    await asyncio.to_thread(cluster.start)
    try:
        chaos = Chaos(cluster, CI)

        async def schedule(chaos: Chaos) -> None:
            await chaos.traffic(BETWEEN)
            dropped: list[ChaosClient] = []
            for step in steps:
                if step == "node":
                    await chaos.fault(lambda: cluster.kill_nodes([0]))
                elif step == "two nodes":
                    await chaos.fault(lambda: cluster.kill_nodes([1, 2]))
                elif step == "redis restart":
                    await chaos.fault(cluster.restart_redis)
                elif step == "pause":
                    await chaos.fault(lambda: cluster.pause_redis(2.0))
                elif step == "short pause":
                    await chaos.fault(cluster.pause_redis)
                elif step == "drop":
                    dropped = chaos.drop_clients(CI.clients // 5)
                else:
                    assert step == "back", step
                    chaos.back(dropped)
                await chaos.traffic(BETWEEN)

        report = await chaos.run(schedule)
    finally:
        await asyncio.to_thread(cluster.close)
    print(report.summary())
    assert report.held, report.summary()
    return report.figures


@pytest.mark.redis
@pytest.mark.e2e
async def test_with_aof_every_acknowledged_message_reaches_every_member_once_in_order(
        tmp_path: Path) -> None:
    figures = await run(tmp_path, aof=True, steps=[
        "node", "drop", "redis restart", "back", "pause", "two nodes", "short pause", "drop",
        "node", "back"])
    assert figures["node SIGKILL"] == 4
    assert figures["Redis SIGKILL + restart (AOF)"] == 1
    assert figures["Redis SIGSTOP + SIGCONT"] == 2
    # The faults bit: clients were cut off, told to resume, resumed, and were recovered, the
    # dropped ones after missing messages that Redis kept across its restart.
    assert figures["close 4004"] >= CI.clients // 2  # the restart, and a feed lost in a pause
    assert figures["close 1006"] > 0  # the SIGKILLed nodes' clients
    assert figures["joined recovered=true"] >= 2 * CI.clients
    assert figures["messages received in joined.history"] > 2 * BETWEEN
    assert figures["sends acked"] >= 5 * BETWEEN
    assert figures["sends unavailable"] > 0


@pytest.mark.redis
@pytest.mark.e2e
async def test_without_persistence_every_client_that_missed_messages_was_told_so(
        tmp_path: Path) -> None:
    figures = await run(tmp_path, aof=False, steps=[
        "node", "drop", "redis restart", "back", "pause", "two nodes", "drop", "redis restart",
        "back", "short pause"])
    assert figures["Redis SIGKILL + restart (no persistence)"] == 2
    # Everyone resumed into a history that Redis lost and was told recovered=false; the
    # clients that were offline across a restart really missed messages, and were told.
    assert figures["joins told recovered=false (checked)"] >= 2 * CI.clients
    assert figures["messages missed and announced by recovered=false"] > 0
    assert figures["close 4004"] >= CI.clients
