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
        if a and b:
            check("server CPU per delivery <= ceiling (1.0x)", "chatd", a <= b,
                  f"chatd {a:.2f} us, ceiling {b:.2f} us: {a / b:.2f}x", full)
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
        row("server ms/connection", [x.get("cpu_ms_per_connection") for x in s])
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
