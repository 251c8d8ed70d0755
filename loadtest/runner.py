"""The coordinator: runs a plan against one target with several worker processes.

Exchange with each worker (over a pipe; workers also send ``progress`` at any time):

1. worker ``hello``; coordinator ``connect`` with a wall-clock start (one arrival schedule for all)
2. worker ``ready`` once its connections are open and joined
3. coordinator ``go`` with a wall-clock start of the measured phase
4. worker ``sent`` when its schedule is done and its acks are in (bounded by ``drain``)
5. coordinator ``collect`` once deliveries have stopped arriving (quiet for ``QUIET`` seconds)
6. worker ``acked`` (per sender, which sequence numbers the server acknowledged); coordinator
   ``acked`` with the union; worker ``result`` with its counts, including losses against it
7. coordinator ``close``

Server CPU and RSS are sampled around each phase, so CPU is charged per delivery only for the
measured phase and memory per connection only for the connect phase.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait
from typing import Any

from loadtest import stats
from loadtest.quiet import OthersMeter
from loadtest.scenarios import Plan
from loadtest.servers import Probe, Sample, ServerError, close_counts, fanout_buckets
from loadtest.worker import BIN, cpu_seconds
from loadtest.worker import main as worker_main

#: Seconds without a new delivery after which in-flight messages are taken as all arrived.
QUIET = 0.5
#: The most seconds to wait for the frames set off by joining to stop arriving.
SETTLE = 30.0
#: Seconds between server samples.
SAMPLE_EVERY = 0.5


class RunError(Exception):
    """The run could not be carried out (a worker died, a phase timed out, the server exited)."""


@dataclass
class Target:
    """A server to run against: its URLs, how to probe it, the secret its tokens need."""

    name: str
    urls: list[str]
    secret: str
    probe: Probe | None = None
    alive: Callable[[], None] = lambda: None
    #: the server processes on this machine (and Redis): not "other" load.
    pids: list[int] = field(default_factory=list)


class Progress:
    """A one-line progress bar on stderr (a line every few seconds when stderr is not a TTY)."""

    def __init__(self, enabled: bool = True, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = 0.0
        self.shown = False

    def update(self, label: str, done: float, total: float, extra: str = "",
               force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = f"{label:<18} [{bar}] {done:>8.0f}/{total:<8.0f} {extra}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.enabled and self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = False

    def note(self, text: str) -> None:
        if self.enabled:
            self.done()
            self.stream.write(text + "\n")
            self.stream.flush()


@dataclass
class _State:
    progress: dict[int, dict[str, Any]] = field(default_factory=dict)
    inbox: dict[str, dict[int, tuple[Any, ...]]] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)


class Coordinator:
    """Starts the workers for one target and walks them through the phases."""

    def __init__(self, plan: Plan, target: Target, sources: list[str],
                 progress: Progress) -> None:
        self.plan = plan
        self.target = target
        self.sources = sources
        self.bar = progress
        self.st = _State()
        self.pipes: list[Pipe] = []
        self.procs: list[Any] = []
        self.t_start = time.time()
        self.last_sample = 0.0
        #: closes by code reported by the server's /metrics during the run (None: unknown).
        self.server_closes: dict[str, int] | None = None
        #: called at phase boundaries: connect_start, connect_end, measure_start, measure_end
        #: (``--profile`` starts and stops py-spy there).
        self.hooks: dict[str, Callable[[], None]] = {}
        #: measures the CPU of everything else on the machine during the measured phase.
        self.others = OthersMeter(target.pids)
        self.others_cores: float | None = None
        self.others_cores_connect: float | None = None
        #: chatd's own fan-out time per message over the measured phase (from /metrics).
        self.fanout_ms: dict[str, Any] | None = None

    def hook(self, name: str) -> None:
        fn = self.hooks.get(name)
        if fn is not None:
            fn()

    # -- plumbing ---------------------------------------------------------------------------

    def sample(self) -> Sample | None:
        if self.target.probe is None:
            return None
        try:
            s = self.target.probe.sample()
        except ServerError as exc:
            self.target.alive()
            raise RunError(str(exc)) from None
        self.st.samples.append(s)
        self.last_sample = time.monotonic()
        return s

    def broadcast(self, *msg: Any) -> None:
        for pipe in self.pipes:
            pipe.send(msg)

    def pump(self, until: Callable[[], bool], timeout: float, what: str,
             show: Callable[[], None] = lambda: None) -> None:
        """Handle worker messages until ``until()`` holds; RunError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise RunError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.poll(0.1, what)
            show()

    def poll(self, timeout: float, what: str) -> None:
        """Handle the worker messages that arrive within ``timeout``; sample the server."""
        for pipe in wait(self.pipes, timeout=timeout):
            assert isinstance(pipe, Pipe)
            try:
                msg = pipe.recv()
            except EOFError:
                dead = [p.pid for p in self.procs if not p.is_alive()]
                raise RunError(f"a worker process died (pids {dead}) during {what}") from None
            kind, wid = msg[0], msg[1]
            if kind == "error":
                raise RunError(f"worker {wid} failed: {msg[2]}")
            if kind == "progress":
                self.st.progress[wid] = msg[2]
            else:
                self.st.inbox.setdefault(kind, {})[wid] = msg
                if kind in ("ready", "sent"):
                    self.st.progress[wid] = msg[2]
        if time.monotonic() - self.last_sample >= SAMPLE_EVERY:
            self.target.alive()
            self.sample()

    def wait_quiet(self, key: str, limit: float) -> None:
        """Wait until the workers' ``key`` counter stops moving for QUIET s (at most ``limit``)."""
        last, quiet_since = self.total(key), time.monotonic()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and time.monotonic() - quiet_since < QUIET:
            self.poll(0.05, key)
            now_total = self.total(key)
            if now_total != last:
                last, quiet_since = now_total, time.monotonic()

    def have(self, kind: str) -> Callable[[], bool]:
        return lambda: len(self.st.inbox.get(kind, {})) == len(self.pipes)

    def total(self, key: str) -> int:
        return sum(int(p.get(key, 0)) for p in self.st.progress.values())

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        ctx = multiprocessing.get_context("spawn")
        try:
            for wid in range(self.plan.workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=worker_main,
                    args=(self.plan, wid, self.target.urls, self.sources, self.target.secret,
                          child),
                    daemon=True,
                    name=f"loadtest-worker-{wid}",
                )
                proc.start()
                child.close()
                self.pipes.append(parent)
                self.procs.append(proc)
            return self._phases()
        finally:
            self.bar.done()
            for pipe in self.pipes:
                with contextlib.suppress(OSError):
                    pipe.send(("close",))
            for proc in self.procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5)

    def _phases(self) -> dict[str, Any]:
        p = self.plan.params
        n = len(self.plan.conns)
        name = self.target.name
        self.pump(self.have("hello"), 60, "the workers to start")
        s0 = self.sample()
        closes0 = close_counts(self.target.urls)
        cpu0 = cpu_seconds()
        self.hook("connect_start")
        self.others.start(p.pid for p in self.procs if p.pid is not None)
        start = time.time() + 0.3
        self.broadcast("connect", start)
        ramp = n / p.connect_rate if p.connect_rate > 0 else 0.0

        def show_connect() -> None:
            done = self.total("connected") + self.total("failed")
            rate = self.total("connected") / max(1e-3, time.time() - start)
            self.bar.update(f"{name} connect", done, n,
                            f"ok {self.total('connected')} failed {self.total('failed')} "
                            f"{rate:,.0f}/s")

        self.pump(self.have("ready"), ramp + p.connect_timeout + 60, "connections", show_connect)
        show_connect()
        self.bar.done()
        self.others_cores_connect = self.others.stop()
        self.hook("connect_end")
        # Settle: joins can set off a burst of frames (presence to every member: N^2/2 in one
        # room); start measuring only once the clients have read them.
        self.wait_quiet("frames", SETTLE)
        fan0 = fanout_buckets(self.target.urls) if self.target.name == "chatd" else None
        s1 = self.sample()
        self.hook("measure_start")
        self.others.start()
        go = time.time() + 0.3
        self.broadcast("go", go)
        s_go = s1
        expect_sent = sum(s.count for s in self.plan.senders)

        def show_send() -> None:
            elapsed = max(0.0, time.time() - go)
            self.bar.update(f"{name} {p.scenario}", min(elapsed, p.duration), p.duration,
                            f"s  sent {self.total('sent')}/{expect_sent} "
                            f"delivered {self.total('delivered')}")

        self.pump(self.have("sent"), p.duration + p.drain + 60, "the measured phase", show_send)
        self.wait_quiet("delivered", p.drain)
        show_send()
        self.bar.done()
        s_end = self.sample()
        self.others_cores = self.others.stop()
        fan1 = fanout_buckets(self.target.urls) if fan0 is not None else None
        if fan0 is not None and fan1 is not None:
            delta = {b: n - fan0.get(b, 0.0) for b, n in fan1.items()}
            self.fanout_ms = {
                "count": int(max(delta.values(), default=0)),
                **{f"p{q:g}": None if (v := stats.histogram_quantile(delta, q)) is None
                   else round(v * 1e3, 3) for q in (50.0, 99.0)},
            }
        self.hook("measure_end")
        self.broadcast("collect")
        self.pump(self.have("acked"), 60, "acknowledgement maps")
        merged: dict[int, bytes] = {}
        for msg in self.st.inbox["acked"].values():
            merged.update(msg[2])
        self.broadcast("acked", merged)
        self.pump(self.have("result"), 120, "worker results")
        results = [self.st.inbox["result"][w][2] for w in sorted(self.st.inbox["result"])]
        closes1 = close_counts(self.target.urls)
        if closes0 is not None and closes1 is not None:
            self.server_closes = {k: v - closes0.get(k, 0) for k, v in closes1.items()
                                  if v - closes0.get(k, 0)}
        ready_cpu = sum(self.st.inbox["ready"][w][3] for w in self.st.inbox["ready"])
        return self.summarize(results, s0, s1, s_go, s_end, ready_cpu, cpu_seconds() - cpu0)

    # -- summary --------------------------------------------------------------------------------

    def summarize(self, results: list[dict[str, Any]], s0: Sample | None, s1: Sample | None,
                  s_go: Sample | None, s_end: Sample | None, connect_client_cpu: float,
                  coordinator_cpu: float) -> dict[str, Any]:
        p = self.plan.params
        def add(key: str) -> int:
            return sum(int(r[key]) for r in results)

        def merge(key: str) -> dict[str, int]:
            c: Counter[str] = Counter()
            for r in results:
                c.update(r[key])
            return dict(c)

        connect_lat = stats.floats(r["connect_lat"] for r in results)
        lat = stats.floats(r["lat"] for r in results)
        lat_slow = stats.floats(r["lat_slow"] for r in results)
        send_lag = stats.floats(r["send_lag"] for r in results)
        nbins = len(array("I", results[0]["tl_sent"])) if results else 0
        tl_sent = [0] * nbins
        tl_deliv = [0] * nbins
        lat_bin: array[int] = array("I")
        lat_of_bin: array[float] = array("f")
        for r in results:
            for i, v in enumerate(array("I", r["tl_sent"])):
                tl_sent[i] += v
            for i, v in enumerate(array("I", r["tl_delivered"])):
                tl_deliv[i] += v
            lat_bin.frombytes(r["lat_bin"])
            lat_of_bin.frombytes(r["lat_of_bin"])
        last = max((i for i, v in enumerate(tl_deliv) if v or tl_sent[i]), default=-1) + 1
        tl_sent, tl_deliv = tl_sent[:last], tl_deliv[:last]
        delivered = add("delivered")
        connected = add("connected")
        # Arrivals start at the same wall time in every worker; the span ends at the last success.
        span = max((r["connect_span"] for r in results), default=0.0)
        client_cpu = sum(r["cpu"] for r in results)
        util = [round(r["cpu"] / r["wall"], 3) if r["wall"] else 0.0 for r in results]
        out: dict[str, Any] = {
            "target": self.target.name,
            "urls": self.target.urls,
            "workers": self.plan.workers,
            "connect": {
                "attempted": len(self.plan.conns),
                "ok": connected,
                "failed": len(self.plan.conns) - connected,
                "failures": merge("connect_fail"),
                "latency_ms": stats.summary(connect_lat),
                "span_s": round(span, 3),
                "rate_per_s": round(connected / span, 1) if span > 0 else None,
                "arrival_rate_per_s": p.connect_rate,
                "client_cpu_s": round(connect_client_cpu, 3),
            },
            "messages": {
                "scheduled": sum(s.count for s in self.plan.senders),
                "sent": add("sent"),
                "acked": add("acked"),
                "errors": merge("errors"),
                "delivered": delivered,
                "expected": add("expected"),
                "received": add("received"),
                "lost": add("lost"),
                "duplicated": add("duplicated"),
                "unexpected": add("unexpected"),
                "deliveries_per_s": round(delivered / p.duration, 1) if p.duration else None,
            },
            "latency_ms": stats.summary(lat),
            "send_lag_ms": stats.summary(send_lag),
            "closes": merge("closes"),
            "server_closes": self.server_closes,
            "bad_frames": add("bad_frames"),
            "other_frames": merge("other_frames"),
            "timeline": {
                "bin_s": BIN,
                "sent": tl_sent,
                "delivered": tl_deliv,
                "p50_ms": stats.per_bin(lat_bin, lat_of_bin, last, 50)[:last],
                "p99_ms": stats.per_bin(lat_bin, lat_of_bin, last, 99)[:last],
                "server": [[round(s.t - self.t_start, 2), round(s.cpu, 3), s.rss]
                           for s in self.st.samples],
            },
            "others_cores": self.others_cores,
            "others_cores_connect": self.others_cores_connect,
            "client": {
                "cpu_s": round(client_cpu, 3),
                "coordinator_cpu_s": round(coordinator_cpu, 3),
                "worker_util": util,
                "saturated": any(u > 0.85 for u in util),
            },
            "_latencies": lat,  # for the picture; dropped before JSON
            "_connect_latencies": connect_lat,
        }
        if self.plan.slow_at is not None:
            out["latency_before_slow_ms"] = out.pop("latency_ms")
            out["latency_ms"] = stats.summary(lat_slow)
            out["slow"] = {"count": add("slow"), "closes": merge("slow_closes")}
            out["_latencies"] = lat_slow
            out["_latencies_before"] = lat
        if self.plan.churn:
            churn_lat = stats.floats(r["churn_lat"] for r in results)
            cycles = add("churn_cycles")
            out["churn"] = {
                "slots": len(self.plan.churn),
                "cycles": cycles,
                "per_s": round(cycles / p.duration, 1) if p.duration else None,
                "failures": merge("churn_fail"),
                "latency_ms": stats.summary(churn_lat),
            }
        if s0 is not None and s1 is not None and s_go is not None and s_end is not None:
            samples = self.st.samples
            cpu_phase = s_end.cpu - s_go.cpu
            out["server"] = {
                "cpu_connect_s": round(s1.cpu - s0.cpu, 3),
                "cpu_ms_per_connection": round((s1.cpu - s0.cpu) * 1e3 / connected, 4)
                if connected else None,
                "cpu_s": round(cpu_phase, 3),
                "cpu_util": round(cpu_phase / max(1e-9, s_end.t - s_go.t), 3),
                "cpu_us_per_delivery": round(cpu_phase * 1e6 / delivered, 3) if delivered
                else None,
                "rss_start_mb": round(s0.rss / 2**20, 1),
                "rss_connected_mb": round(s1.rss / 2**20, 1),
                "rss_end_mb": round(s_end.rss / 2**20, 1),
                "rss_max_mb": round(max(s.rss for s in samples) / 2**20, 1),
                "rss_kb_per_connection": round((s1.rss - s0.rss) / 1024 / connected, 2)
                if connected else None,
            }
            out["server"]["fanout_ms"] = self.fanout_ms
            out["client"]["cpu_vs_server"] = (
                round(client_cpu / cpu_phase, 2) if cpu_phase > 0 else None
            )
            if s_go.aux_cpu is not None and s_end.aux_cpu is not None:
                # The Redis the nodes share: what fan-out through it costs on top of the nodes.
                aux = s_end.aux_cpu - s_go.aux_cpu
                both = cpu_phase + aux
                out["server"].update({
                    "redis_cpu_s": round(aux, 3),
                    "redis_cpu_util": round(aux / max(1e-9, s_end.t - s_go.t), 3),
                    "redis_us_per_delivery": round(aux * 1e6 / delivered, 3) if delivered
                    else None,
                    "cpu_us_per_delivery_with_redis": round(both * 1e6 / delivered, 3)
                    if delivered else None,
                })
                if s0.aux_cpu is not None and s1.aux_cpu is not None and connected:
                    out["server"]["redis_cpu_ms_per_connection"] = round(
                        (s1.aux_cpu - s0.aux_cpu) * 1e3 / connected, 4)
        return out
