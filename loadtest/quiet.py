"""Waiting for a quiet machine before a measurement, and saying how quiet it was.

Client and server share the machine, so anything else running on it (a test suite, a build)
takes CPU from one of them and shows up as latency or as a lower connect rate that chatd did
not cause. Before each measurement the harness waits (up to ``--quiet-wait`` seconds) until

- the 1-minute load average is below ``--max-load`` (1.0 by default for full runs), and
- processes other than the harness and the servers it measures used less than
  :data:`OTHERS_MAX` of a core over the last second (the load average lags by a minute: a test
  suite that just started would not show in it yet).

The load average also carries the harness's own previous run for a minute or so, which this
waits out as well: a run then starts with the servers' caches warm but the cores idle.
Whatever happened, the figures (``load1``, ``load5``, ``others_cores``, ``waited_s`` and
``quiet``) go into the results, so a reader knows what the machine was doing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

#: Cores other processes may use during the one-second look before a measurement.
OTHERS_MAX = 0.3
#: Cores other processes may have used during a measured phase before it is measured again.
OTHERS_MAX_DURING = 0.3
#: Seconds between two looks while waiting.
RETRY_EVERY = 5.0

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def load_average() -> tuple[float, float, float]:
    """``os.getloadavg()`` (what ``uptime`` prints); zeros where it is not available."""
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux
        return (0.0, 0.0, 0.0)


def _busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(v) for v in fields]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user.
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + (ticks[7] if len(ticks) > 7
                                                                   else 0)
    return busy / CLK_TCK


def _own_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def others_cores(own_pids: Iterable[int], window: float = 1.0) -> float | None:
    """Cores used by every process but ``own_pids`` (and this one) over ``window`` seconds."""
    pids = {os.getpid(), *own_pids}
    try:
        b0, o0, t0 = _busy_seconds(), _own_seconds(pids), time.monotonic()
        time.sleep(window)
        b1, o1, t1 = _busy_seconds(), _own_seconds(pids), time.monotonic()
    except (OSError, ValueError, IndexError):  # pragma: no cover - no /proc
        return None
    return max(0.0, ((b1 - b0) - (o1 - o0)) / max(1e-6, t1 - t0))


class OthersMeter:
    """CPU used by other processes over a phase: was the run disturbed while it measured?

    The look before a run cannot see a test suite that starts a minute into it; this one
    covers the measured phase itself. ``own_pids`` are the servers; the harness adds its
    workers when the phase starts.
    """

    def __init__(self, own_pids: Iterable[int]) -> None:
        self.pids = {os.getpid(), *own_pids}
        self._start: tuple[float, float, float] | None = None

    def start(self, more_pids: Iterable[int] = ()) -> None:
        self.pids.update(more_pids)
        try:
            self._start = (_busy_seconds(), _own_seconds(self.pids), time.monotonic())
        except (OSError, ValueError, IndexError):  # pragma: no cover - no /proc
            self._start = None

    def stop(self) -> float | None:
        """Cores the other processes used since :meth:`start` (None: unknown)."""
        if self._start is None:
            return None
        b0, o0, t0 = self._start
        try:
            b1, o1, t1 = _busy_seconds(), _own_seconds(self.pids), time.monotonic()
        except (OSError, ValueError, IndexError):  # pragma: no cover
            return None
        return round(max(0.0, ((b1 - b0) - (o1 - o0)) / max(1e-6, t1 - t0)), 3)


def wait_quiet(max_load: float | None, max_wait: float, own_pids: Iterable[int],
               note: Callable[[str], None] = lambda _s: None) -> dict[str, object]:
    """Wait until the machine is quiet (see the module docstring); returns what was seen.

    Args:
        max_load: the 1-minute load average to get below; None: do not wait, only record.
        max_wait: the most seconds to wait; past it the run goes ahead marked ``quiet: False``.
        own_pids: the servers under test (their own CPU does not count as someone else's).
        note: where to say that it is waiting (the progress bar).
    """
    own = list(own_pids)
    start = time.monotonic()
    said = False
    while True:
        load = load_average()
        others = None if max_load is None else others_cores(own)
        quiet = max_load is None or (load[0] < max_load
                                     and (others is None or others < OTHERS_MAX))
        waited = time.monotonic() - start
        if quiet or waited >= max_wait:
            if not quiet:
                note(f"machine still busy after {waited:.0f} s (load {load[0]:.2f}, others "
                     f"{others or 0:.2f} cores): measuring anyway, marked busy in the results")
            return {"load1": round(load[0], 2), "load5": round(load[1], 2),
                    "others_cores": None if others is None else round(others, 2),
                    "waited_s": round(waited, 1), "max_load": max_load, "quiet": quiet}
        if not said:
            note(f"waiting for a quiet machine: load average {load[0]:.2f} (want < {max_load}), "
                 f"other processes {others or 0:.2f} cores; up to {max_wait:.0f} s")
            said = True
        time.sleep(RETRY_EVERY)
