"""The invariants of a chaos run, checked on plain data (no sockets), so they are testable alone.

What a run leaves behind:

- every ``send`` a client made (:class:`Send`): its room, its unique text, and its outcome —
  ``acked`` (with the id), ``unavailable`` (the node said it was not carried out), ``unknown``
  (the connection died first, or no answer came), or another error code;
- every client's :class:`View` of every room it is in: the message ids it received, live or in a
  resumed ``joined.history``, in arrival order, and where it was told ``recovered: false``;
- each room's retained history at the end, paged forward (``final``).

:func:`check` holds a run to the delivery guarantees of ``docs/protocol.md``:

1. History: ids strictly increasing, no text stored twice, nothing stored that nobody sent, an
   acknowledged message stored under the id its ``ack`` named, nothing stored whose send was
   refused with another error. ``unavailable`` and ``unknown`` sends may be stored, at most once.
2. Every acknowledged message is in the final history — with persistence, all of them; without,
   those sent after the last Redis restart (the earlier ones were lost with it, as documented).
3. Every view is strictly increasing (each message at most once per client, in id order).
4. Every view is complete between its first and its last id, against the *universe* of the room
   (every id acknowledged, stored, or seen by any client): with AOF on, no hole at all and no
   ``recovered: false``; without persistence, every hole must sit exactly where the client was
   told ``recovered: false`` — never a silent gap. (A 4004 close alone does not excuse a hole: the
   client resumes after it and the server's ``recovered: true`` then claims nothing is missing.)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Violations listed in a summary (all are kept in the report).
SHOWN = 30


def pack(msg_id: str) -> int:
    """A message id ``"<ms>-<seq>"`` as one comparable integer (ms in the high bits)."""
    ms, _, seq = msg_id.partition("-")
    n = int(seq)
    assert n < 1 << 20, msg_id
    return int(ms) << 20 | n


def unpack(key: int) -> str:
    return f"{key >> 20}-{key & 0xFFFFF}"


@dataclasses.dataclass(slots=True)
class Send:
    """One ``send`` command and what came of it."""

    client: int
    room: str
    text: str
    issued: float  # time.monotonic() when it was sent
    outcome: str = "pending"  # acked | unavailable | unknown | <error code>
    id: str | None = None


class View:
    """What one client received in one room, across all its connections."""

    __slots__ = ("disorder", "ids", "last", "last_id", "told_at")

    def __init__(self) -> None:
        self.ids = array("q")
        self.told_at: list[int] = []  # len(ids) when a join answered recovered: false
        self.disorder: list[tuple[str, str | None]] = []  # (id, the last id before it)
        self.last = -1
        self.last_id: str | None = None

    def add(self, msg_id: str) -> None:
        key = pack(msg_id)
        if key <= self.last:  # a repeat or out of order: kept aside, reported
            self.disorder.append((msg_id, self.last_id))
            return
        self.ids.append(key)
        self.last, self.last_id = key, msg_id

    def told(self) -> None:
        """The server said this client's copy may have a hole here (``recovered: false``)."""
        self.told_at.append(len(self.ids))


@dataclasses.dataclass
class Report:
    figures: dict[str, Any]
    violations: list[str]

    @property
    def held(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        lines = [f"chaos run ({self.figures.get('persistence')} persistence): "
                 + ("every invariant held" if self.held
                    else f"{len(self.violations)} VIOLATIONS")]
        lines += [f"  {k}: {v}" for k, v in self.figures.items()]
        lines += [f"  ! {v}" for v in self.violations[:SHOWN]]
        if len(self.violations) > SHOWN:
            lines.append(f"  ! ... {len(self.violations) - SHOWN} more")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"figures": self.figures, "violations": self.violations}


def check(final: Mapping[str, Sequence[tuple[str, str]]], sends: Iterable[Send],
          views: Mapping[tuple[int, str], View], *, aof: bool,
          data_lost_at: Sequence[float] = (), figures: dict[str, Any] | None = None) -> Report:
    """Check a run (see the module docstring); ``data_lost_at``: monotonic times of restarts
    of a Redis without persistence."""
    sends = list(sends)
    out: list[str] = []
    fig: dict[str, Any] = dict(figures or {})
    by_text = {s.text: s for s in sends}
    outcomes = Counter(s.outcome for s in sends if s.client >= 0)
    fig.update({f"sends {k}": v for k, v in sorted(outcomes.items())})
    stored_after: Counter[str] = Counter()

    # 1. the final history of each room
    stored: dict[str, set[int]] = {}
    for room, entries in final.items():
        keys = [pack(i) for i, _ in entries]
        stored[room] = set(keys)
        bad_order = [(unpack(a), unpack(b)) for a, b in itertools.pairwise(keys)
                     if b <= a]
        if bad_order:
            out.append(f"{room}: history not in increasing id order at {bad_order[:3]}")
        for text, n in Counter(t for _, t in entries).items():
            if n > 1:
                out.append(f"{room}: {text!r} stored {n} times")
        for msg_id, text in entries:
            s = by_text.get(text)
            if s is None or s.room != room:
                out.append(f"{room}: {msg_id} {text!r} is stored but nobody sent it there")
            elif s.outcome == "acked" and s.id != msg_id:
                out.append(f"{room}: {text!r} acknowledged as {s.id}, stored as {msg_id}")
            elif s.outcome not in ("acked", "unknown", "unavailable"):
                out.append(f"{room}: {text!r} stored although its send answered {s.outcome}")
            elif s.outcome != "acked":
                stored_after[s.outcome] += 1
    fig["messages in final history"] = sum(len(e) for e in final.values())
    fig["stored although answered unavailable"] = stored_after["unavailable"]
    fig["stored although the ack was lost (unknown)"] = stored_after["unknown"]

    # 2. acknowledged means stored (after the last loss of a Redis without persistence)
    cutoff = max(data_lost_at, default=-math.inf)
    must = [s for s in sends if s.outcome == "acked" and s.issued > cutoff]
    lost = [s for s in must if s.id is None or pack(s.id) not in stored.get(s.room, ())]
    for s in lost[:SHOWN]:
        out.append(f"{s.room}: acknowledged {s.id} {s.text!r} is missing from the history")
    if len(lost) > SHOWN:
        out.append(f"... {len(lost) - SHOWN} more acknowledged messages missing")
    fig["acknowledged messages that must be in the history"] = len(must)

    # 3 and 4. every client's view of every room
    universe: dict[str, set[int]] = {room: set(keys) for room, keys in stored.items()}
    for s in sends:
        if s.outcome == "acked" and s.id is not None:
            universe.setdefault(s.room, set()).add(pack(s.id))
    for (_, room), v in views.items():
        universe.setdefault(room, set()).update(v.ids)
    ordered = {room: sorted(keys) for room, keys in universe.items()}
    covered = told = checked = 0
    for (client, room), v in sorted(views.items()):
        who = f"client {client} in {room}"
        checked += len(v.ids)
        told += len(v.told_at)
        for msg_id, before in v.disorder[:3]:
            out.append(f"{who}: got {msg_id} again or out of order (after {before})")
        if aof and v.told_at:
            out.append(f"{who}: told recovered=false {len(v.told_at)} times with AOF on")
        if not v.ids:
            out.append(f"{who}: never received anything")
            continue
        u = ordered[room]
        pos = [bisect_left(u, k) for k in v.ids]
        marks = set(v.told_at)
        holes = [(i, pos[i] - pos[i - 1] - 1) for i in range(1, len(pos))
                 if pos[i] - pos[i - 1] > 1]
        tail = len(u) - 1 - pos[-1]
        if tail:
            holes.append((len(pos), tail))
        for i, missing in holes:
            if not aof and i in marks:
                covered += missing
                continue
            after = unpack(v.ids[i - 1])
            upto = unpack(v.ids[i]) if i < len(v.ids) else "the end"
            out.append(f"{who}: silent gap of {missing} message(s) after {after}, before "
                       f"{upto}" + (" (told recovered=false elsewhere)" if marks else ""))
        if aof:
            phantom = [k for k in v.ids if k not in stored.get(room, ())]
            if phantom:
                out.append(f"{who}: received {unpack(phantom[0])} (and {len(phantom) - 1} "
                           "more) that the history does not hold")
    fig["views checked (client x room)"] = len(views)
    fig["deliveries checked in views"] = checked
    fig["joins told recovered=false (checked)"] = told
    fig["messages missed and announced by recovered=false"] = covered
    return Report(fig, out)
