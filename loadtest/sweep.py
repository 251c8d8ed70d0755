"""``--rates``: the highest delivery rate a node sustains, then latency at a share of it.

The target "p99 <= 50 ms at 70% of the node's maximum throughput" needs the maximum first. The
sweep runs the scenario (fan-out, typically) at each message rate of ``--rates`` in turn, against
the same server, each step a complete run (connect, settle, measure, count). A step is
*sustained* when

- the deliveries that arrived by ``ON_TIME_GRACE`` seconds after the last scheduled send are at
  least ``--sustain`` (99%) of the deliveries the schedule intended (messages x members): a node
  that falls behind builds a backlog that grows for the whole step, and
- its p99 stays under ``--explode-ms`` (500 ms), and its median latency does not climb over the
  step (:func:`latency_grows`): a node at its limit queues, and the queue shows as latency long
  before anything is lost.

The sweep stops at the first step that is not sustained, then bisects between the last
sustained rate and that one ``--refine`` times. The maximum is the highest sustained *intended*
delivery rate. A final run at ``--at`` (0.7) of it is the measurement the latency target is
judged on, made ``--repeat`` (3) times: on a shared virtual machine the same run's p99 varies
by a factor of several from one minute to the next (the server's own CPU per delivery varies by
a third with it, so the host, not the load, moves), and one run would be luck either way. The
run with the median p99 is the main run of the report; every step and every final run's figures
are kept in ``sweep``.

Client and server share the machine: when a step's client workers are saturated (over 85% of a
core), the limit found is at least partly the harness's own. Each step says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Seconds after the last scheduled send within which a delivery still counts as on time.
ON_TIME_GRACE = 0.5
#: Growth of the median latency over a step (ms) below which it is jitter, not a queue.
GROWTH_MS = 20.0


@dataclass
class SweepOptions:
    """The knobs of a sweep (``--rates``, ``--at``, ``--sustain``, ``--explode-ms``, ...)."""

    rates: list[float]
    at: float = 0.7
    sustain: float = 0.99
    explode_ms: float = 500.0
    refine: int = 1
    repeat: int = 3


@dataclass
class SweepResult:
    """The steps in the order they ran, the maximum found, and the final run."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    max_rate: float | None = None
    max_deliveries_per_s: float | None = None
    max_reached: bool = False
    final: dict[str, Any] | None = None
    #: Every final run's verdict, in the order they ran (``final`` is the median's run).
    finals: list[dict[str, Any]] = field(default_factory=list)
    final_rate: float | None = None
    note: str = ""

    def summary(self, opts: SweepOptions) -> dict[str, Any]:
        return {
            "rates": opts.rates,
            "at": opts.at,
            "sustain": opts.sustain,
            "explode_ms": opts.explode_ms,
            "refine": opts.refine,
            "repeat": opts.repeat,
            "steps": self.steps,
            "max_rate": self.max_rate,
            "max_deliveries_per_s": self.max_deliveries_per_s,
            "max_reached": self.max_reached,
            "final_rate": self.final_rate,
            "final_deliveries_per_s": None if self.final is None
            else self.final["sweep_step"]["intended_per_s"],
            "finals": self.finals,
            "note": self.note,
        }


def latency_grows(p50_by_bin: list[float | None]) -> bool:
    """True when the median of the last quarter of the phase is well above the first quarter's.

    A node past its limit queues: latency then climbs for as long as the step lasts, which a
    p99 over a short step may not yet show. "Well above": more than twice, and by more than
    :data:`GROWTH_MS` (a few milliseconds of jitter at low latency is not a queue).
    """
    values = [v for v in p50_by_bin if v is not None]
    if len(values) < 8:
        return False
    q = len(values) // 4
    first = sorted(values[:q])[q // 2]
    last = sorted(values[-q:])[q // 2]
    return last > 2 * first and last - first > GROWTH_MS


def judge(run: dict[str, Any], rate: float, members: int, duration: float,
          opts: SweepOptions) -> dict[str, Any]:
    """One step's verdict and the figures it rests on."""
    m = run["messages"]
    tl = run["timeline"]
    bins = int((duration + ON_TIME_GRACE) / tl["bin_s"])
    on_time = sum(tl["delivered"][:bins])
    # What the schedule intended: every scheduled message to every member of its room.
    intended = m["scheduled"] * members
    ratio = on_time / intended if intended else 0.0
    p99 = run["latency_ms"]["p99"]
    growing = latency_grows(tl["p50_ms"][:bins])
    sustained = (ratio >= opts.sustain and p99 is not None and p99 <= opts.explode_ms
                 and not growing)
    server = run.get("server", {})
    return {
        "rate": rate,
        "intended_per_s": round(rate * members, 1),
        "on_time_ratio": round(ratio, 4),
        "delivered_per_s": m["deliveries_per_s"],
        "p50_ms": run["latency_ms"]["p50"],
        "p99_ms": p99,
        "p99.9_ms": run["latency_ms"]["p99.9"],
        "send_lag_p99_ms": run["send_lag_ms"]["p99"],
        "server_cpu_util": server.get("cpu_util"),
        "server_us_per_delivery": server.get("cpu_us_per_delivery"),
        "client_util": run["client"]["worker_util"],
        "client_saturated": run["client"]["saturated"],
        "lost": m["lost"],
        "latency_grows": growing,
        "machine": run.get("machine"),
        "sustained": sustained,
    }


def sweep(measure: Callable[[float | None], dict[str, Any]], members: int, duration: float,
          opts: SweepOptions, say: Callable[[str], None]) -> SweepResult:
    """Run the steps with ``measure(rate) -> run``; return every step and the final run."""
    res = SweepResult()
    best: float | None = None
    worst: float | None = None

    def step(rate: float) -> bool:
        run = measure(rate)
        verdict = judge(run, rate, members, duration, opts)
        res.steps.append(verdict)
        say(f"sweep: {rate:g} msg/s ({verdict['intended_per_s']:,.0f} deliveries/s): "
            f"{verdict['on_time_ratio']:.1%} on time, p99 {verdict['p99_ms']} ms, server "
            f"{verdict['server_cpu_util']} core, client {verdict['client_util']}: "
            f"{'sustained' if verdict['sustained'] else 'NOT sustained'}")
        return bool(verdict["sustained"])

    for rate in sorted(opts.rates):
        if step(rate):
            best = rate
        else:
            worst = rate
            break
    if worst is not None and best is not None:
        lo, hi = best, worst
        for _ in range(opts.refine):
            mid = round((lo + hi) / 2, 1)
            if mid in (lo, hi):
                break
            if step(mid):
                lo = mid
            else:
                hi = mid
        best = lo
    if best is None:
        res.note = (f"the lowest rate ({min(opts.rates):g} msg/s) was not sustained: give lower "
                    "--rates")
        return res
    res.max_rate = best
    res.max_deliveries_per_s = round(best * members, 1)
    res.max_reached = worst is not None
    if not res.max_reached:
        res.note = (f"every rate was sustained: the maximum is above {best:g} msg/s, so the "
                    "final run is below the intended share of it; give higher --rates")
    final_rate = round(best * opts.at, 2)
    res.final_rate = final_rate
    say(f"sweep: maximum {best:g} msg/s ({res.max_deliveries_per_s:,.0f} deliveries/s); "
        f"final run at {opts.at:.0%}: {final_rate:g} msg/s")
    runs = []
    for k in range(opts.repeat):
        run = measure(final_rate)
        run["sweep_step"] = judge(run, final_rate, members, duration, opts)
        res.finals.append(run["sweep_step"])
        runs.append(run)
        say(f"sweep: final run {k + 1} of {opts.repeat} at {final_rate:g} msg/s: "
            f"p99 {run['sweep_step']['p99_ms']} ms")
    res.final = median_run(runs)
    return res


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose p99 is the median (the lower middle one of an even count)."""
    def p99(run: dict[str, Any]) -> float:
        value = run["latency_ms"]["p99"]
        return float("inf") if value is None else float(value)

    ordered = sorted(runs, key=p99)
    return ordered[(len(ordered) - 1) // 2]
