"""Results: the JSON document, the checks against the targets, a text table, and the picture."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

#: Targets of issue 5 (docs/benchmarks.md); a check is only judged at the size it is stated for.
RSS_TARGET_MB_PER_10K = 250.0
CONNECT_RATE_TARGET = 1000.0
P99_TARGET_MS = 50.0
SLOW_P99_TOLERANCE = 1.20
REDIS_RATIO_TARGET = 1.25
#: Connections of the full run per scenario: targets are judged from this size on.
FULL_SIZE = {"connect-storm": 10000, "idle-soak": 10000, "fan-out": 1000, "slow-consumers": 1000}


def host_info() -> dict[str, Any]:
    """What the figures were measured on (client and server share this machine)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def checks(scenario: str, runs: list[dict[str, Any]], params: dict[str, Any]) -> list[
    dict[str, Any]
]:
    """Pass/fail of correctness (every scenario) and of the issue's targets that apply."""
    out: list[dict[str, Any]] = []
    # The targets are stated for the full sizes; a smaller run reports the figure unjudged.
    full = params.get("connections", 0) >= int(FULL_SIZE.get(scenario, 0))

    def check(name: str, target: str, ok: bool, detail: str, judged: bool = True) -> None:
        out.append({"name": name, "target": target, "ok": bool(ok) if judged else None,
                    "detail": detail if judged else f"{detail} (not judged below full size)"})

    by = {r["target"]: r for r in runs}
    for r in runs:
        t, m = r["target"], r["messages"]
        check("no lost deliveries", t, m["lost"] == 0,
              f"{m['lost']} lost of {m['expected']} expected")
        check("no duplicated deliveries", t, m["duplicated"] == 0,
              f"{m['duplicated']} duplicated")
        if scenario not in ("churn",):
            failed = r["connect"]["failed"]
            check("no connect failures", t, failed == 0,
                  f"{failed} failed: {r['connect']['failures']}" if failed else "0 failed")
        if scenario == "connect-storm":
            rate = r["connect"]["rate_per_s"] or 0.0
            check(f"connect+auth >= {CONNECT_RATE_TARGET:,.0f}/s", t,
                  rate >= CONNECT_RATE_TARGET,
                  f"{rate:,.0f}/s over {r['connect']['ok']} sockets", full)
        if scenario == "idle-soak" and "server" in r:
            per10k = r["server"]["rss_connected_mb"] * 10000 / max(1, r["connect"]["ok"])
            check(f"RSS <= {RSS_TARGET_MB_PER_10K:.0f} MB per 10,000 idle sockets", t,
                  per10k <= RSS_TARGET_MB_PER_10K,
                  f"{r['server']['rss_connected_mb']} MB for {r['connect']['ok']} sockets "
                  f"({per10k:.0f} MB per 10,000)", full)
        if "sweep" in r:
            sw = r["sweep"]
            p99 = r["latency_ms"]["p99"]
            detail = (f"p99 {p99} ms at {sw['final_rate']:g} msg/s "
                      f"({sw['final_deliveries_per_s']:,.0f} deliveries/s), {sw['at']:.0%} of "
                      f"the maximum sustained {sw['max_deliveries_per_s']:,.0f} deliveries/s")
            finals = [f["p99_ms"] for f in sw.get("finals", [])]
            if len(finals) > 1:
                detail += (f"; the median of {len(finals)} runs: p99 "
                           + ", ".join(_fmt(v) for v in finals) + " ms")
            if not sw["max_reached"]:
                detail += " (maximum not reached: give higher --rates)"
            check(f"p99 <= {P99_TARGET_MS:.0f} ms at {sw['at']:.0%} of max throughput", t,
                  p99 is not None and p99 <= P99_TARGET_MS, detail,
                  full and bool(sw["max_reached"]))
        if scenario == "slow-consumers" and "slow" in r:
            before = r["latency_before_slow_ms"]["p99"]
            after = r["latency_ms"]["p99"]
            if before and after:
                check("others' p99 within 20% while 5% are slow", t,
                      after <= before * SLOW_P99_TOLERANCE,
                      f"p99 {before:.1f} ms before, {after:.1f} ms with slow consumers", full)
            # A slow client sees the 4002 frame only if it reads its backlog before the server
            # gives up the closing handshake; the server's own count is the better witness.
            seen = sum(v for k, v in r["slow"]["closes"].items() if k.startswith("4002"))
            reported = (r.get("server_closes") or {}).get("4002", 0)
            n4002 = max(seen, reported)
            check("slow consumers closed with 4002", t, n4002 >= r["slow"]["count"],
                  f"{n4002} of {r['slow']['count']} closed with 4002 (server says {reported}, "
                  f"clients saw {r['slow']['closes']})")
    chatd, ceiling = by.get("chatd"), by.get("ceiling")
    if scenario == "fan-out" and chatd and ceiling and "server" in chatd and "server" in ceiling:
        a = chatd["server"]["cpu_us_per_delivery"]
        b = ceiling["server"]["cpu_us_per_delivery"]
        nodes = int(params.get("nodes", 1))
        with_redis = chatd["server"].get("cpu_us_per_delivery_with_redis")
        if a and b and nodes == 1 and with_redis is None:
            check("server CPU per delivery <= ceiling (1.0x)", "chatd", a <= b,
                  f"chatd {a:.2f} us, ceiling {b:.2f} us: {a / b:.2f}x", full)
        elif a and b:
            # Through Redis: the nodes' CPU plus Redis's own is judged (Redis is part of what
            # a delivery costs); the nodes alone are reported next to it.
            judged = with_redis if with_redis is not None else a
            what = "nodes + Redis" if with_redis is not None else "nodes (Redis not measured)"
            check(f"CPU per delivery through Redis, {nodes} node(s), <= "
                  f"{REDIS_RATIO_TARGET:.2f}x ceiling", "chatd",
                  judged <= b * REDIS_RATIO_TARGET,
                  f"{what} {judged:.2f} us ({judged / b:.2f}x), nodes alone {a:.2f} us "
                  f"({a / b:.2f}x), ceiling {b:.2f} us", full)
    return out


def comparison(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """chatd / ceiling ratios, when both ran."""
    by = {r["target"]: r for r in runs}
    chatd, ceiling = by.get("chatd"), by.get("ceiling")
    if not (chatd and ceiling and "server" in chatd and "server" in ceiling):
        return {}
    out: dict[str, Any] = {}
    for key in ("cpu_us_per_delivery", "cpu_ms_per_connection", "rss_kb_per_connection",
                "rss_max_mb"):
        a, b = chatd["server"].get(key), ceiling["server"].get(key)
        if a is not None and b:
            out[f"{key}_ratio"] = round(a / b, 3)
    a = chatd["server"].get("cpu_us_per_delivery_with_redis")
    b = ceiling["server"].get("cpu_us_per_delivery")
    if a is not None and b:
        out["cpu_us_per_delivery_with_redis_ratio"] = round(a / b, 3)
    pa, pb = chatd["latency_ms"].get("p99"), ceiling["latency_ms"].get("p99")
    if pa is not None and pb:
        out["p99_ratio"] = round(pa / pb, 3)
    return out


def document(scenario: str, params: dict[str, Any], runs: list[dict[str, Any]],
             argv: list[str]) -> dict[str, Any]:
    """The results JSON (runs without their raw sample lists)."""
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
    return {
        "scenario": scenario,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["python", "-m", "loadtest", *argv],
        "host": host_info(),
        "params": params,
        "runs": clean,
        "comparison": comparison(runs),
        "checks": checks(scenario, clean, params),
    }


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def table(doc: dict[str, Any]) -> str:
    """A plain text summary for the terminal."""
    runs = doc["runs"]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list[Any], unit: str = "") -> None:
        rows.append((label, [_fmt(v, unit) for v in values]))

    row("connections ok", [r["connect"]["ok"] for r in runs])
    row("connect failures", [r["connect"]["failed"] for r in runs])
    row("connect rate /s", [r["connect"]["rate_per_s"] for r in runs])
    row("connect p99 ms", [r["connect"]["latency_ms"]["p99"] for r in runs])
    row("messages sent", [r["messages"]["sent"] for r in runs])
    row("deliveries", [r["messages"]["delivered"] for r in runs])
    row("deliveries /s", [r["messages"]["deliveries_per_s"] for r in runs])
    row("lost", [r["messages"]["lost"] for r in runs])
    row("duplicated", [r["messages"]["duplicated"] for r in runs])
    for q in ("p50", "p90", "p99", "p99.9", "max"):
        row(f"latency {q} ms", [r["latency_ms"][q] for r in runs])
    if any("latency_before_slow_ms" in r for r in runs):
        row("p99 before slow ms",
            [r.get("latency_before_slow_ms", {}).get("p99") for r in runs])
    if any("server" in r for r in runs):
        s = [r.get("server", {}) for r in runs]
        row("server cpu s", [x.get("cpu_s") for x in s])
        row("server us/delivery", [x.get("cpu_us_per_delivery") for x in s])
        if any("redis_cpu_s" in x for x in s):
            row("redis cpu s", [x.get("redis_cpu_s") for x in s])
            row("redis us/delivery", [x.get("redis_us_per_delivery") for x in s])
            row("nodes+redis us/deliv.", [x.get("cpu_us_per_delivery_with_redis") for x in s])
        row("server ms/connection", [x.get("cpu_ms_per_connection") for x in s])
        if any(x.get("fanout_ms") for x in s):
            row("server fan-out p50 ms", [(x.get("fanout_ms") or {}).get("p50") for x in s])
            row("server fan-out p99 ms", [(x.get("fanout_ms") or {}).get("p99") for x in s])
        row("server RSS MB (conn)", [x.get("rss_connected_mb") for x in s])
        row("server RSS MB (max)", [x.get("rss_max_mb") for x in s])
        row("RSS KB/connection", [x.get("rss_kb_per_connection") for x in s])
    row("client cpu s (connect)", [r["connect"]["client_cpu_s"] for r in runs])
    row("client cpu s", [r["client"]["cpu_s"] for r in runs])
    row("client saturated", [str(r["client"]["saturated"]) for r in runs])
    if any("server" in r for r in runs):
        row("server cpu util", [r.get("server", {}).get("cpu_util") for r in runs])
    width = max(len(label) for label, _ in rows)
    head = " " * width + "  " + "  ".join(f"{r['target']:>14}" for r in runs)
    lines = [f"{doc['scenario']}  ({doc['params']['connections']} connections)", head]
    lines += [f"{label:<{width}}  " + "  ".join(f"{v:>14}" for v in vals) for label, vals in rows]
    for r in runs:
        sw = r.get("sweep")
        if not sw:
            continue
        lines.append(f"sweep ({r['target']}): offered deliveries/s -> on time, p99, server, "
                     "client workers")
        for st in sw["steps"]:
            lines.append(f"  {st['rate']:>8g} msg/s {st['intended_per_s']:>10,.0f}/s  "
                         f"{st['on_time_ratio']:>7.2%}  p99 {_fmt(st['p99_ms'], ' ms'):>12}  "
                         f"server {_fmt(st['server_cpu_util'])} core  client "
                         f"{st['client_util']}  {'ok' if st['sustained'] else 'NOT sustained'}")
        lines.append(f"  maximum sustained: {_fmt(sw['max_deliveries_per_s'])} deliveries/s; "
                     f"final run at {sw['at']:.0%}: {_fmt(sw['final_deliveries_per_s'])}/s"
                     + (f"  ({sw['note']})" if sw["note"] else ""))
        finals = sw.get("finals", [])
        if finals:
            lines.append("  final runs: p99 " + ", ".join(_fmt(f["p99_ms"]) for f in finals)
                         + " ms; server " + ", ".join(_fmt(f["server_cpu_util"]) for f in finals)
                         + " core; the median run is reported above")
    for r in runs:
        mc = r.get("machine")
        if mc:
            lines.append(f"machine ({r['target']}): load average {mc['load1']} / {mc['load5']}, "
                         f"other processes {mc['others_cores']} cores before, "
                         f"{mc.get('others_cores_connect')} while connecting, "
                         f"{mc.get('others_cores_during')} while measuring; waited "
                         f"{mc['waited_s']} s"
                         + ("" if mc["quiet"] and not mc.get("disturbed")
                            else "  BUSY: figures pessimistic"))
    for k, v in doc["comparison"].items():
        lines.append(f"{k}: {v}")
    for c in doc["checks"]:
        mark = "INFO" if c["ok"] is None else "PASS" if c["ok"] else "FAIL"
        lines.append(f"[{mark}] {c['target']}: {c['name']}: {c['detail']}")
    return "\n".join(lines)


def _ccdf(sorted_values: list[float], points: int = 2000) -> tuple[list[float], list[float]]:
    """Complementary CDF (fraction of samples slower), thinned but keeping the whole tail."""
    n = len(sorted_values)
    if n <= 2 * points:
        idx = list(range(n))
    else:
        step = (n - points) / points
        idx = [int(k * step) for k in range(points)] + list(range(n - points, n))
    return [max(1e-3, sorted_values[i]) for i in idx], [1.0 - i / n for i in idx]


def picture(doc: dict[str, Any], runs: list[dict[str, Any]], path: Path) -> bool:
    """Latency distribution, throughput over time, latency over time, server memory over time.

    Returns False (and writes nothing) when matplotlib is not installed: ``pip install
    chatd[loadtest]``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=80)
    (ax_lat, ax_tp), (ax_lt, ax_mem) = axes
    title = f"chatd loadtest: {doc['scenario']}, {doc['params']['connections']} connections"
    fig.suptitle(title)
    for k, r in enumerate(runs):
        name = r["target"]
        color = f"C{k}"
        lat = r.get("_latencies") or []
        label_kind = "delivery"
        if not lat:
            lat = r.get("_connect_latencies") or []
            label_kind = "connect+auth"
        if lat:
            ax_lat.plot(*_ccdf(lat), color=color, label=f"{name} ({label_kind})")
            before = r.get("_latencies_before")
            if before:
                ax_lat.plot(*_ccdf(before), color=color, linestyle="--",
                            label=f"{name} before slow consumers")
        tl = r["timeline"]
        xs = [i * tl["bin_s"] for i in range(len(tl["delivered"]))]
        if xs:
            ax_tp.plot(xs, [v / tl["bin_s"] for v in tl["delivered"]], color=color,
                       label=f"{name} deliveries/s")
            ax_lt.plot(xs, [v if v is not None else float("nan") for v in tl["p99_ms"]],
                       color=color, label=f"{name} p99")
            ax_lt.plot(xs, [v if v is not None else float("nan") for v in tl["p50_ms"]],
                       color=color, linestyle=":", label=f"{name} p50")
        server = tl["server"]
        if server:
            ax_mem.plot([s[0] for s in server], [s[2] / 2**20 for s in server], color=color,
                        label=f"{name} RSS")
    ax_lat.set_xscale("log")
    ax_lat.set_yscale("log")
    ax_lat.set_xlabel("latency (ms)")
    ax_lat.set_ylabel("fraction slower")
    ax_lat.set_title("latency distribution (from intended send time)")
    ax_tp.set_xlabel("seconds into the measured phase")
    ax_tp.set_ylabel("per second")
    ax_tp.set_title("throughput over time")
    ax_tp.set_ylim(bottom=0)
    ax_lt.set_ylim(bottom=0)
    ax_lt.set_xlabel("seconds into the measured phase")
    ax_lt.set_ylabel("ms")
    ax_lt.set_title("delivery latency over time")
    ax_mem.set_xlabel("seconds since the run started")
    ax_mem.set_ylabel("MB")
    ax_mem.set_title("server resident memory")
    for ax in (ax_lat, ax_tp, ax_lt, ax_mem):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def sweep_picture(runs: list[dict[str, Any]], path: Path) -> bool:
    """Delivery rate achieved and p99 against the rate offered, for each swept target."""
    swept = [r for r in runs if r.get("sweep")]
    if not swept:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_tp, ax_p99) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=80)
    for k, r in enumerate(swept):
        steps = sorted(r["sweep"]["steps"], key=lambda st: st["rate"])
        xs = [st["intended_per_s"] for st in steps]
        color = f"C{k}"
        ax_tp.plot(xs, [st["intended_per_s"] * st["on_time_ratio"] for st in steps], "o-",
                   color=color, label=f"{r['target']} on time")
        ax_p99.plot(xs, [st["p99_ms"] for st in steps], "o-", color=color,
                    label=f"{r['target']} p99")
        final = r["sweep"]["final_deliveries_per_s"]
        if final:
            finals = [f["p99_ms"] for f in r["sweep"].get("finals", [])] or [
                r["latency_ms"]["p99"]]
            ax_p99.plot([final] * len(finals), finals, "x", markersize=8, color=color,
                        label=f"{r['target']} runs at {r['sweep']['at']:.0%} of max")
            ax_p99.plot([final], [r["latency_ms"]["p99"]], "*", markersize=14, color=color,
                        label=f"{r['target']} median run")
            ax_tp.axvline(r["sweep"]["max_deliveries_per_s"], color=color, linestyle=":",
                          label=f"{r['target']} max sustained")
    lim = max(st["intended_per_s"] for r in swept for st in r["sweep"]["steps"])
    ax_tp.plot([0, lim], [0, lim], color="grey", linewidth=0.8, label="offered")
    ax_tp.set_xlabel("offered deliveries/s")
    ax_tp.set_ylabel("delivered on time /s")
    ax_tp.set_title("throughput sweep")
    ax_p99.set_yscale("log")
    ax_p99.axhline(P99_TARGET_MS, color="red", linewidth=0.8, linestyle="--",
                   label=f"{P99_TARGET_MS:.0f} ms")
    ax_p99.set_xlabel("offered deliveries/s")
    ax_p99.set_ylabel("p99 latency (ms)")
    ax_p99.set_title("delivery latency")
    for ax in (ax_tp, ax_p99):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
