"""``python -m loadtest SCENARIO [options]``: the command line of the load harness.

Examples (docs/benchmarks.md has the full list):

    python -m loadtest fan-out --start-server both            # chatd and the ceiling, one run
    python -m loadtest connect-storm --smoke --start-server chatd
    python -m loadtest dm --url ws://10.0.0.5:8765/ws --state-dir /var/lib/chatd
    python -m loadtest ceiling --port 8766                     # just run the ceiling server
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtest import report, scenarios, sweep
from loadtest.profile import Profiler, summarize
from loadtest.quiet import OTHERS_MAX_DURING, wait_quiet
from loadtest.runner import Coordinator, Progress, RunError, Target
from loadtest.servers import (
    Managed,
    MetricsProbe,
    Probe,
    ProcProbe,
    ServerError,
    start_ceiling,
    start_chatd,
)
from loadtest.tokens import SecretError, find_secret
from loadtest.worker import raise_nofile

#: Descriptors a worker needs besides its sockets (pipes, event loop, imports).
FD_MARGIN = 64


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("must be a number >= 0")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"not a ws:// URL: {text!r}")
    if parts.scheme == "wss":
        raise argparse.ArgumentTypeError("wss:// is not supported: point it at the node itself")
    return text


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load harness for chatd: opens many WebSocket connections, sends on a fixed "
        "schedule, and reports latency percentiles, lost/duplicated deliveries, and the "
        "server's CPU and memory per delivery and per connection, next to a bare-broadcast "
        "ceiling server.",
    )
    ap.add_argument("scenario", choices=[*scenarios.SCENARIOS, "ceiling"],
                    help="what to run; 'ceiling' runs the reference server "
                    "(see python -m loadtest ceiling --help)")
    g = ap.add_argument_group("target")
    g.add_argument("--url", action="append", type=_url, default=[],
                   help="node URL, e.g. ws://127.0.0.1:8765/ws; repeat for several nodes "
                   "(connections are spread round-robin)")
    g.add_argument("--ceiling-url", action="append", type=_url, default=[],
                   help="also run the same scenario against a ceiling server at this URL")
    g.add_argument("--start-server", choices=("chatd", "ceiling", "both"),
                   help="start the server(s) as subprocesses with a temp state dir and a config "
                   "that lifts the per-connection rate limit; 'both' runs chatd then the ceiling")
    g.add_argument("--nodes", type=_positive_int, default=1,
                   help="chatd nodes to start; more than 1 share a Redis: a private "
                   "redis-server the harness starts on a free port, or --redis-url")
    g.add_argument("--redis-url", default="",
                   help="CHATD_REDIS_URL for the chatd nodes started, instead of a private "
                   "redis-server (its CPU is then counted only with --redis-pid)")
    g.add_argument("--private-redis", action="store_true",
                   help="start a private redis-server even for one node (the Redis backend)")
    g.add_argument("--redis-pid", action="append", type=int, default=[],
                   help="the pid of the Redis the nodes use, to count its CPU apart")
    g.add_argument("--ceiling-fanout", choices=("broadcast", "frame"), default="broadcast",
                   help="ceiling fan-out: websockets.broadcast() (default) or one framed write "
                   "per recipient")
    g.add_argument("--server-pid", action="append", type=int, default=[],
                   help="read CPU/RSS from /proc/PID instead of GET /metrics (repeat per node)")
    g.add_argument("--no-server-stats", action="store_true",
                   help="do not probe the server (no /metrics access)")
    g = ap.add_argument_group("authentication")
    g.add_argument("--secret", help="HS256 secret to mint tokens (default $CHATD_JWT_SECRET, "
                   "else <state-dir>/jwt-secret)")
    g.add_argument("--state-dir", help="the chatd node's state directory (to read jwt-secret)")
    g.add_argument("--auth", choices=("query", "frame", "login"),
                   help="token in ?token= (default), first-frame auth, or login with --password")
    g.add_argument("--password", help="password of the users <prefix><i> for --auth login")
    g.add_argument("--user-prefix", help="user names are <prefix><i> (default lt)")
    g = ap.add_argument_group("load (defaults: the full benchmark; --smoke: seconds)")
    g.add_argument("--smoke", action="store_true", help="a few hundred sockets for seconds")
    g.add_argument("-n", "--connections", type=_positive_int)
    g.add_argument("--connect-rate", type=_non_negative,
                   help="new connections per second (0: all at once)")
    g.add_argument("--rate", type=_non_negative, help="messages per second, all senders")
    g.add_argument("--senders", type=_positive_int, help="senders (fan-out, slow-consumers)")
    g.add_argument("--room-size", type=_positive_int, help="members per room")
    g.add_argument("--duration", type=_non_negative, help="seconds of sending (or holding)")
    g.add_argument("--size", type=_positive_int, help="characters per message text (<= 4000)")
    g.add_argument("--slow-fraction", type=_fraction, help="share of slow consumers")
    g.add_argument("--churn", type=_count, help="churning connection slots")
    g.add_argument("--churn-life", type=_non_negative, help="seconds a churning connection lives")
    g.add_argument("--connect-timeout", type=_non_negative)
    g.add_argument("--max-outbound", type=_positive_int,
                   help="limits.max_outbound_bytes of the servers the harness starts")
    g.add_argument("--drain", type=_non_negative,
                   help="most seconds to wait for in-flight deliveries")
    g = ap.add_argument_group("throughput sweep (docs/benchmarks.md: p99 at 70% of the maximum)")
    g.add_argument("--rates", type=_rates,
                   help="comma-separated message rates: run each in turn until one is not "
                   "sustained, bisect, then run at --at of the highest sustained rate")
    g.add_argument("--at", type=_fraction, default=0.7,
                   help="share of the maximum for the final run (default 0.7)")
    g.add_argument("--sustain", type=_fraction, default=0.99,
                   help="share of intended deliveries that must arrive on time (default 0.99)")
    g.add_argument("--explode-ms", type=_non_negative, default=500.0,
                   help="a step whose p99 passes this is not sustained (default 500)")
    g.add_argument("--refine", type=_count, default=1,
                   help="bisection steps between the last sustained rate and the first not "
                   "(default 1)")
    g.add_argument("--repeat", type=_positive_int, default=3,
                   help="final runs at --at of the maximum; the median p99 is judged and every "
                   "run is reported (default 3)")
    g = ap.add_argument_group("a quiet machine (client and server share it)")
    g.add_argument("--max-load", type=_non_negative,
                   help="before each measurement wait until the 1-minute load average is "
                   "below this and other processes are idle (default 1.0; --smoke: do not "
                   "wait; 0: do not wait)")
    g.add_argument("--quiet-wait", type=_non_negative, default=600.0,
                   help="the most seconds to wait for a quiet machine, then measure anyway, "
                   "marked busy (default 600)")
    g.add_argument("--retries", type=_count, default=2,
                   help="measure again when other processes used more than "
                   f"{OTHERS_MAX_DURING} cores during the measured phase (default 2; only "
                   "when waiting for quiet)")
    g = ap.add_argument_group("harness")
    g.add_argument("--profile", choices=("connect", "measure"),
                   help="sample the servers the harness started (or --server-pid) with py-spy "
                   "during the connect phase or the measured phase; writes "
                   "<out>/<name>-<target>-<phase>-<k>.folded and prints a summary")
    g.add_argument("--workers", type=_positive_int,
                   help="client processes (default: the number of cores)")
    g.add_argument("--source-addrs", type=_count,
                   help="spread source addresses over 127.0.0.2..127.0.0.(K+1) for loopback "
                   "targets (default 8; 0: let the kernel choose)")
    g.add_argument("--out", default="loadtest-results", help="directory for JSON and PNG")
    g.add_argument("--name", help="file name stem (default <scenario>-<time>)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--check", action="store_true",
                   help="exit 1 when a check (lost, duplicated, a target) fails")
    return ap


def build_params(args: argparse.Namespace) -> scenarios.Params:
    params = scenarios.defaults(args.scenario, args.smoke)
    overrides: dict[str, Any] = {}
    for f in dataclasses.fields(scenarios.Params):
        value = getattr(args, f.name, None)
        if f.name != "scenario" and value is not None:
            overrides[f.name] = value
    return dataclasses.replace(params, **overrides)


def source_addresses(urls: list[str], k: int) -> list[str]:
    """127.0.0.2.. when every target is on IPv4 loopback; else none (the kernel chooses)."""
    if k <= 0:
        return []
    for url in urls:
        host = urlsplit(url).hostname or ""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return []
        if ip.version != 4 or not ip.is_loopback:
            return []
    return [f"127.0.0.{2 + i}" for i in range(min(k, 250))]


def ephemeral_ports() -> int:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(hi) - int(lo) + 1
    except (OSError, ValueError):
        return 28000


def fail(message: str, code: int = 2) -> int:
    print(f"loadtest: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ceiling"]:
        from loadtest import ceiling

        return ceiling.main(argv[1:])
    args = parser().parse_args(argv)
    if args.size is not None and args.size > 4000:
        return fail("--size: must be at most 4000 (the server's default limits.max_text_chars)")
    private_redis = bool(args.start_server in ("chatd", "both") and not args.redis_url
                         and (args.nodes > 1 or args.private_redis))
    if (args.nodes > 1 or args.private_redis) and args.start_server not in ("chatd", "both"):
        return fail("--nodes/--private-redis: only for nodes the harness starts "
                    "(--start-server chatd|both); give --url once per node otherwise")
    if args.private_redis and args.redis_url:
        return fail("--private-redis and --redis-url are exclusive")
    if args.auth == "login" and not args.password:
        return fail("--auth login needs --password (users <prefix><i> must exist)")
    if not args.url and not args.ceiling_url and not args.start_server:
        return fail("give --url (and/or --ceiling-url) or --start-server chatd|ceiling|both")
    if args.url and args.start_server in ("chatd", "both"):
        return fail("--url and --start-server chatd are exclusive")
    params = build_params(args)
    workers = args.workers or max(1, os.cpu_count() or 1)
    workers = min(workers, params.connections)
    soft, hard = raise_nofile()
    churn = params.churn if params.scenario == "churn" else 0
    per_worker = math.ceil(params.connections / workers) + math.ceil(churn / workers)
    if per_worker + FD_MARGIN > soft:
        return fail(
            f"the file descriptor limit stops this run: each of {workers} workers needs about "
            f"{per_worker + FD_MARGIN} descriptors but RLIMIT_NOFILE is {soft} (hard {hard}); "
            f"raise the hard limit (ulimit -Hn, LimitNOFILE=) or use more --workers"
        )
    plan = scenarios.build(params, workers)
    if args.start_server and len(plan.conns) + len(plan.churn) + FD_MARGIN > soft:
        print(f"loadtest: warning: the server started here inherits RLIMIT_NOFILE {soft}, "
              f"fewer than {len(plan.conns)} connections need", file=sys.stderr)

    sweep_opts: sweep.SweepOptions | None = None
    per_message = 0
    if args.rates:
        if params.scenario not in ("fan-out", "many-rooms", "dm"):
            return fail("--rates: only for fan-out, many-rooms and dm")
        sweep_opts = sweep.SweepOptions(args.rates, at=args.at, sustain=args.sustain,
                                        explode_ms=args.explode_ms, refine=args.refine,
                                        repeat=args.repeat)
        per_message = (plan.audience(plan.senders[0]) if params.scenario == "fan-out"
                       else params.room_size if params.scenario == "many-rooms" else 1)
    max_load = (None if args.smoke else 1.0) if args.max_load is None else (
        args.max_load or None)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{params.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"

    names: list[str] = []
    if args.start_server in ("chatd", "both") or args.url:
        names.append("chatd")
    if args.start_server in ("ceiling", "both") or args.ceiling_url:
        names.append("ceiling")
    sources_k = 8 if args.source_addrs is None else args.source_addrs
    bar = Progress(enabled=not args.quiet)
    bench = Bench(args, params, plan, workers, bar, max_load, out / stem)
    runs: list[dict[str, Any]] = []
    for name in names:
        managed: Managed | None = None
        try:
            if name == "chatd" and args.url:
                urls = args.url
                try:
                    secret = find_secret(args.secret, args.state_dir)
                except SecretError as exc:
                    return fail(str(exc))
                target = Target("chatd", urls, secret, _probe(args, urls))
            elif name == "ceiling" and args.ceiling_url:
                urls = args.ceiling_url
                target = Target("ceiling", urls, "ceiling-accepts-any-token-0123456789abcdef",
                                None if args.no_server_stats else MetricsProbe(urls))
            else:
                bar.note(f"starting {name} ...")
                managed = (
                    start_chatd(nodes=args.nodes, redis_url=args.redis_url,
                                max_outbound=params.max_outbound, private_redis=private_redis)
                    if name == "chatd"
                    else start_ceiling(fanout=args.ceiling_fanout,
                                       max_outbound=params.max_outbound)
                )
                probe: Probe | None = managed.probe
                if name == "chatd" and args.redis_pid and isinstance(probe, ProcProbe):
                    probe.aux_pids = args.redis_pid
                if args.no_server_stats:
                    probe = None
                target = Target(name, managed.urls, managed.secret, probe, managed.check_alive)
            sources = source_addresses(target.urls, sources_k)
            capacity = ephemeral_ports() * max(1, len(sources)) * len(set(target.urls))
            if len(plan.conns) + len(plan.churn) > capacity:
                return fail(f"{len(plan.conns)} connections exceed the ~{capacity} ephemeral "
                            "ports available: raise --source-addrs")
            servers = ([pr.pid for pr in managed.procs] if managed is not None
                       else args.server_pid if name == "chatd" else [])
            target.pids = _own_pids(managed, args)
            measure = bench.measurer(target, sources, target.pids, servers)
            if sweep_opts is not None:
                res = sweep.sweep(measure, per_message, params.duration, sweep_opts, bar.note)
                if res.final is None:
                    return fail(f"{name}: {res.note}", 1)
                res.final["sweep"] = res.summary(sweep_opts)
                runs.append(res.final)
            else:
                runs.append(measure(None))
        except (RunError, ServerError) as exc:
            return fail(f"{name}: {exc}", 1)
        finally:
            if managed is not None:
                managed.stop()
        _explain_failures(runs[-1], soft)

    info = dataclasses.asdict(params)
    info["workers"] = workers
    info["nodes"] = len(args.url) if args.url else args.nodes
    info["redis"] = "private" if private_redis else "given" if args.redis_url else None
    doc = report.document(params.scenario, info, runs, argv)
    if bench.profiles:
        doc["profiles"] = bench.profiles
    json_path = out / f"{stem}.json"
    png_path = out / f"{stem}.png"
    drawn = False if args.no_plot else report.picture(doc, runs, png_path)
    if drawn:
        doc["picture"] = str(png_path)
    sweep_png = out / f"{stem}-sweep.png"
    if not args.no_plot and report.sweep_picture(runs, sweep_png):
        doc["sweep_picture"] = str(sweep_png)
    report.write_json(doc, json_path)
    print(report.table(doc))
    print(f"results: {json_path}" + (f"  picture: {png_path}" if drawn else ""))
    if not drawn and not args.no_plot:
        print("no picture: matplotlib is missing (pip install 'chatd[loadtest]')",
              file=sys.stderr)
    if args.check and any(c["ok"] is False for c in doc["checks"]):
        return 1
    return 0


class Bench:
    """One measurement at a time against a target: wait for quiet, run, profile if asked."""

    def __init__(self, args: argparse.Namespace, params: scenarios.Params, plan: scenarios.Plan,
                 workers: int, bar: Progress, max_load: float | None, stem: Path) -> None:
        self.args = args
        self.params = params
        self.plan = plan
        self.workers = workers
        self.bar = bar
        self.max_load = max_load
        self.stem = stem
        self.profiles: list[str] = []

    def measurer(self, target: Target, sources: list[str], own: list[int],
                 servers: list[int]) -> Callable[[float | None], dict[str, Any]]:
        """``measure(rate)``: one run at ``rate`` messages/s (None: the parameters' rate)."""
        return lambda rate: self.measure(target, sources, own, servers, rate)

    def measure(self, target: Target, sources: list[str], own: list[int], servers: list[int],
                rate: float | None) -> dict[str, Any]:
        """One run; again (up to ``--retries`` times) when others used the CPU during it."""
        for attempt in range(self.args.retries + 1):
            result = self._measure(target, sources, own, servers, rate)
            mc = result["machine"]
            during = [v for v in (mc["others_cores_during"], mc["others_cores_connect"])
                      if v is not None]
            others = max(during, default=0.0)
            if self.max_load is None or others <= OTHERS_MAX_DURING:
                break
            result["machine"]["disturbed"] = True
            if attempt < self.args.retries:
                self.bar.note(f"{target.name}: other processes used {others:.2f} cores during "
                              "the measured phase: measuring again")
        return result

    def _measure(self, target: Target, sources: list[str], own: list[int], servers: list[int],
                 rate: float | None) -> dict[str, Any]:
        p = self.params if rate is None else dataclasses.replace(self.params, rate=rate)
        plan = self.plan if rate is None else scenarios.build(p, self.workers)
        machine = wait_quiet(self.max_load, self.args.quiet_wait, own, self.bar.note)
        at = f" at {rate:g} msg/s" if rate is not None else ""
        self.bar.note(f"{target.name}: {p.scenario} with {len(plan.conns)} connections{at}, "
                      f"{self.workers} workers, {target.urls[0]} "
                      f"(load average {machine['load1']})")
        coordinator = Coordinator(plan, target, sources, self.bar)
        profiler = None
        if self.args.profile and servers:
            step = "" if rate is None else f"-{rate:g}"
            profiler = Profiler(servers, self.stem.with_name(
                f"{self.stem.name}-{target.name}{step}-{self.args.profile}"))
            phase = "connect" if self.args.profile == "connect" else "measure"
            coordinator.hooks[f"{phase}_start"] = profiler.start
            coordinator.hooks[f"{phase}_end"] = profiler.stop_recording
        try:
            result = coordinator.run()
        finally:
            if profiler is not None:
                for path in profiler.stop():
                    self.bar.note(summarize(path, 20))
                    self.profiles.append(str(path))
        machine["others_cores_during"] = result.pop("others_cores", None)
        machine["others_cores_connect"] = result.pop("others_cores_connect", None)
        machine["disturbed"] = False
        result["machine"] = machine
        return result


def _own_pids(managed: Managed | None, args: argparse.Namespace) -> list[int]:
    """The processes under test: their CPU is not "someone else's" when waiting for quiet."""
    pids = [*args.server_pid, *args.redis_pid]
    if managed is not None:
        pids += [p.pid for p in managed.procs]
        if managed.companion is not None:
            pids += [p.pid for p in managed.companion.procs]
    return pids


def _rates(text: str) -> list[float]:
    try:
        rates = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("give message rates > 0, e.g. 40,60,80,100")
    return rates


def _probe(args: argparse.Namespace, urls: list[str]) -> ProcProbe | MetricsProbe | None:
    if args.no_server_stats:
        return None
    if args.server_pid:
        return ProcProbe(args.server_pid, args.redis_pid)
    return MetricsProbe(urls, args.redis_pid)


def _explain_failures(run: dict[str, Any], soft: int) -> None:
    """Say plainly when a limit, not the server, stopped connections."""
    failures: dict[str, int] = run["connect"]["failures"]
    for reason, n in failures.items():
        if "EMFILE" in reason or "ENFILE" in reason:
            print(f"loadtest: {n} connections failed because the harness hit its file "
                  f"descriptor limit (RLIMIT_NOFILE {soft}); raise it or use more --workers",
                  file=sys.stderr)
        elif "EADDRNOTAVAIL" in reason:
            print(f"loadtest: {n} connections failed for lack of ephemeral ports; raise "
                  "--source-addrs", file=sys.stderr)
        elif reason.startswith("close 1013") or reason.startswith("http 503"):
            print(f"loadtest: {n} connections were refused by the server as full "
                  "(limits / limits.max_connections)", file=sys.stderr)
