"""The embedded backend's history costs the cycle collector nothing, however much is kept."""

from __future__ import annotations

import gc

from chatd.backends.base import room_stream
from chatd.backends.memory import MemoryBroker


def _tracked_after_collections() -> int:
    # A retained entry stops being tracked on the collection after the one that first sees it.
    gc.collect()
    gc.collect()
    return len(gc.get_objects())


async def test_retained_messages_add_no_objects_for_full_collections_to_scan() -> None:
    broker = MemoryBroker(max_per_stream=10_000)
    await broker.publish_room("warm", "alice", "first")
    before = _tracked_after_collections()
    for i in range(5_000):
        await broker.publish_room("lobby", "alice", f"message {i}")
    assert len(await broker.recent(room_stream("lobby"), 10_000)) == 5_000
    # Each retained message as an object was two tracked objects (10,000 here); a full
    # collection scans every tracked object, so that was a pause growing with history.
    assert _tracked_after_collections() - before < 100
