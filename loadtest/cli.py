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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtest import report, scenarios
from loadtest.runner import Coordinator, Progress, RunError, Target
from loadtest.servers import (
    Managed,
    MetricsProbe,
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
                   help="chatd nodes to start (needs --redis-url when more than 1)")
    g.add_argument("--redis-url", default="", help="CHATD_REDIS_URL for the chatd nodes started")
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
    g = ap.add_argument_group("harness")
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
    if args.nodes > 1 and not args.redis_url:
        return fail("--nodes: more than one chatd node needs --redis-url")
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

    names: list[str] = []
    if args.start_server in ("chatd", "both") or args.url:
        names.append("chatd")
    if args.start_server in ("ceiling", "both") or args.ceiling_url:
        names.append("ceiling")
    sources_k = 8 if args.source_addrs is None else args.source_addrs
    bar = Progress(enabled=not args.quiet)
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
                                max_outbound=params.max_outbound)
                    if name == "chatd"
                    else start_ceiling(fanout=args.ceiling_fanout,
                                       max_outbound=params.max_outbound)
                )
                target = Target(name, managed.urls, managed.secret, managed.probe,
                                managed.check_alive)
            sources = source_addresses(target.urls, sources_k)
            capacity = ephemeral_ports() * max(1, len(sources)) * len(set(target.urls))
            if len(plan.conns) + len(plan.churn) > capacity:
                return fail(f"{len(plan.conns)} connections exceed the ~{capacity} ephemeral "
                            "ports available: raise --source-addrs")
            bar.note(f"{name}: {params.scenario} with {len(plan.conns)} connections, "
                     f"{workers} workers, {target.urls[0]}")
            runs.append(Coordinator(plan, target, sources, bar).run())
        except (RunError, ServerError) as exc:
            return fail(f"{name}: {exc}", 1)
        finally:
            if managed is not None:
                managed.stop()
        _explain_failures(runs[-1], soft)

    doc = report.document(params.scenario, dataclasses.asdict(params), runs, argv)
    doc["params"]["workers"] = workers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{params.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path = out / f"{stem}.json"
    png_path = out / f"{stem}.png"
    drawn = False if args.no_plot else report.picture(doc, runs, png_path)
    if drawn:
        doc["picture"] = str(png_path)
    report.write_json(doc, json_path)
    print(report.table(doc))
    print(f"results: {json_path}" + (f"  picture: {png_path}" if drawn else ""))
    if not drawn and not args.no_plot:
        print("no picture: matplotlib is missing (pip install 'chatd[loadtest]')",
              file=sys.stderr)
    if args.check and any(c["ok"] is False for c in doc["checks"]):
        return 1
    return 0


def _probe(args: argparse.Namespace, urls: list[str]) -> ProcProbe | MetricsProbe | None:
    if args.no_server_stats:
        return None
    if args.server_pid:
        return ProcProbe(args.server_pid)
    return MetricsProbe(urls)


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
                  "(limits / server.max_connections)", file=sys.stderr)
