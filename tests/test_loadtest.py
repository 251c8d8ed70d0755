"""The load harness: a smoke run against real servers, plus its pure parts.

The smoke runs start a real ``chatd serve`` and the ceiling as subprocesses (``--start-server``),
open a few hundred sockets for a few seconds, and check the harness's own bookkeeping: every
acknowledged message reached every member exactly once, and the JSON and the picture exist.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from array import array
from pathlib import Path

import jwt
import pytest

from loadtest import quiet, report, scenarios, stats, sweep
from loadtest.profile import summarize
from loadtest.servers import parse_metrics
from loadtest.tokens import SecretError, find_secret, mint

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_harness(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args, "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )


def assert_clean_delivery(run: dict) -> None:
    m = run["messages"]
    assert run["connect"]["failed"] == 0, run["connect"]["failures"]
    assert m["sent"] == m["scheduled"] > 0
    assert m["acked"] == m["sent"], m["errors"]
    assert m["lost"] == 0
    assert m["duplicated"] == 0
    assert m["unexpected"] == 0
    assert m["received"] == m["expected"] > 0
    assert run["latency_ms"]["count"] > 0
    assert run["server"]["cpu_us_per_delivery"] > 0


@pytest.mark.e2e
def test_fan_out_smoke_run_against_chatd_and_the_ceiling_loses_nothing(tmp_path: Path) -> None:
    proc = run_harness("fan-out", "--smoke", "--start-server", "both", "--out", str(tmp_path),
                       "--name", "smoke")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["target"] for r in doc["runs"]] == ["chatd", "ceiling"]
    for run in doc["runs"]:
        assert_clean_delivery(run)
        # Every member got every message: deliveries = messages x members.
        assert run["messages"]["delivered"] == run["messages"]["sent"] * doc["params"][
            "connections"]
    assert doc["comparison"]["cpu_us_per_delivery_ratio"] > 0
    assert all(c["ok"] is not False for c in doc["checks"]), doc["checks"]
    assert (tmp_path / "smoke.png").read_bytes()[:8] == PNG_MAGIC
    assert doc["picture"].endswith("smoke.png")


@pytest.mark.e2e
def test_direct_message_smoke_run_with_first_frame_auth_loses_nothing(tmp_path: Path) -> None:
    proc = run_harness("dm", "--smoke", "--start-server", "chatd", "--auth", "frame",
                       "--out", str(tmp_path), "--name", "dm", "--no-plot")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads((tmp_path / "dm.json").read_text())
    (run,) = doc["runs"]
    assert_clean_delivery(run)
    assert run["messages"]["delivered"] == run["messages"]["sent"]
    assert not (tmp_path / "dm.png").exists()


def test_a_run_the_file_descriptor_limit_cannot_carry_is_refused_with_one_line() -> None:
    proc = run_harness("connect-storm", "-n", "10000000", "--workers", "1",
                       "--url", "ws://127.0.0.1:9/ws", "--secret", "s" * 32)
    assert proc.returncode == 2
    assert "file descriptor limit" in proc.stderr
    assert "RLIMIT_NOFILE" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_run_without_a_target_is_a_usage_error() -> None:
    proc = run_harness("fan-out", "--smoke")
    assert proc.returncode == 2
    assert "--start-server" in proc.stderr


def test_the_harness_never_imports_chatd() -> None:
    for path in (ROOT / "loadtest").glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "chatd" or n.startswith("chatd.") for n in names), path


def test_minted_tokens_carry_the_claims_the_contract_requires() -> None:
    secret = "k" * 32
    token = mint(secret, "lt7", ttl=60, now=1_000_000)
    assert jwt.get_unverified_header(token)["typ"] == "JWT"
    claims = jwt.decode(token, secret, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["sub"] == "lt7"
    assert claims["exp"] - claims["iat"] == 60
    assert claims["jti"] != jwt.decode(mint(secret, "lt7"), secret, algorithms=["HS256"])["jti"]


def test_the_secret_is_read_from_the_state_dir_when_not_given(tmp_path: Path) -> None:
    (tmp_path / "jwt-secret").write_text("z" * 43 + "\n")
    assert find_secret(None, str(tmp_path), env={}) == "z" * 43
    assert find_secret(None, str(tmp_path), env={"CHATD_JWT_SECRET": "e" * 32}) == "e" * 32
    assert find_secret("f" * 32, str(tmp_path), env={}) == "f" * 32
    with pytest.raises(SecretError, match="--secret"):
        find_secret(None, None, env={})


def test_senders_share_the_rate_on_interleaved_schedules() -> None:
    p = scenarios.defaults("fan-out", smoke=False)
    plan = scenarios.build(p, workers=2)
    assert len(plan.senders) == p.senders
    assert sum(s.count for s in plan.senders) == pytest.approx(p.rate * p.duration, rel=0.01)
    offsets = sorted(s.offset for s in plan.senders)
    assert offsets == pytest.approx([k / p.rate for k in range(p.senders)])
    assert plan.audience(plan.senders[0]) == p.connections


def test_slow_consumers_are_the_requested_share_and_never_senders() -> None:
    p = scenarios.defaults("slow-consumers", smoke=False)
    plan = scenarios.build(p, workers=2)
    slow = [c.idx for c in plan.conns if c.slow]
    assert len(slow) == round((p.connections - p.senders) * p.slow_fraction)
    assert not set(slow) & {s.idx for s in plan.senders}
    assert plan.slow_at == p.duration * scenarios.SLOW_AT


def test_direct_message_partners_live_in_the_senders_worker() -> None:
    plan = scenarios.build(scenarios.defaults("dm", smoke=True), workers=4)
    for recipient, senders in plan.dm_senders.items():
        for s in senders:
            assert s % 4 == recipient % 4


def test_percentiles_use_the_nearest_rank() -> None:
    values = stats.floats([array("f", [float(v) for v in range(100, 0, -1)]).tobytes()])
    s = stats.summary(values)
    assert (s["p50"], s["p90"], s["p99"], s["p99.9"], s["max"]) == (50, 90, 99, 100, 100)
    assert stats.summary([])["p99"] is None


def test_prometheus_text_yields_the_process_figures() -> None:
    text = ("# HELP process_cpu_seconds_total x\nprocess_cpu_seconds_total 12.5\n"
            'chatd_connections{node="a"} 3\nprocess_resident_memory_bytes 1.048576e+06\n')
    values = parse_metrics(text)
    assert values["process_cpu_seconds_total"] == 12.5
    assert values["process_resident_memory_bytes"] == 1048576
    assert not any(k.startswith("chatd_connections") for k in values)


def test_a_lost_delivery_fails_the_checks() -> None:
    run = {"target": "chatd", "messages": {"lost": 1, "expected": 10, "duplicated": 0},
           "connect": {"failed": 0, "failures": {}}, "latency_ms": {"p99": 1.0}}
    results = report.checks("fan-out", [run], {"connections": 10})
    assert [c["ok"] for c in results if c["name"] == "no lost deliveries"] == [False]


@pytest.mark.e2e
def test_two_nodes_through_a_private_redis_deliver_everything_and_count_redis_cpu(
        tmp_path: Path) -> None:
    # Enough messages for Redis to use several 10 ms clock ticks of CPU (/proc counts in ticks):
    # 40 messages were sometimes all served within one tick, and read as none.
    proc = run_harness("fan-out", "--smoke", "--start-server", "chatd", "--nodes", "2",
                       "--rate", "200", "--duration", "3", "--out", str(tmp_path),
                       "--name", "redis", "--no-plot")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads((tmp_path / "redis.json").read_text())
    assert (doc["params"]["nodes"], doc["params"]["redis"]) == (2, "private")
    (run,) = doc["runs"]
    assert len(run["urls"]) == 2
    assert_clean_delivery(run)
    assert run["messages"]["delivered"] == run["messages"]["sent"] * doc["params"]["connections"]
    server = run["server"]
    assert server["redis_cpu_s"] > 0
    assert server["cpu_us_per_delivery_with_redis"] > server["cpu_us_per_delivery"]


def test_connections_of_each_worker_are_spread_over_every_node() -> None:
    from loadtest.worker import Target

    target = Target(["ws://127.0.0.1:1/ws", "ws://127.0.0.1:2/ws"], [], nworkers=2)
    nodes_of_worker = {w: {target.pick(i)[0] for i in range(w, 40, 2)} for w in (0, 1)}
    assert all(len(urls) == 2 for urls in nodes_of_worker.values())


def _step_run(on_time: int, p99: float, p50_by_bin: list[float], scheduled: int = 100) -> dict:
    return {
        "messages": {"scheduled": scheduled, "deliveries_per_s": 1.0, "lost": 0},
        "timeline": {"bin_s": 0.25, "delivered": [on_time], "p50_ms": p50_by_bin},
        "latency_ms": {"p50": 1.0, "p99": p99, "p99.9": p99},
        "send_lag_ms": {"p99": 0.0},
        "client": {"worker_util": [0.5], "saturated": False},
    }


def test_a_step_is_sustained_only_on_time_and_without_a_growing_queue() -> None:
    opts = sweep.SweepOptions([10.0])
    steady = [5.0] * 40
    assert sweep.judge(_step_run(1000, 20.0, steady), 10.0, 10, 10.0, opts)["sustained"]
    late = sweep.judge(_step_run(980, 20.0, steady), 10.0, 10, 10.0, opts)
    assert not late["sustained"] and late["on_time_ratio"] == 0.98
    assert not sweep.judge(_step_run(1000, 600.0, steady), 10.0, 10, 10.0, opts)["sustained"]
    growing = [5.0 + 3 * i for i in range(40)]
    assert sweep.latency_grows(growing)
    assert not sweep.judge(_step_run(1000, 200.0, growing), 10.0, 10, 10.0, opts)["sustained"]
    assert not sweep.latency_grows([1.0] * 10 + [9.0] * 10)  # jitter, not a queue


def test_the_sweep_bisects_between_the_last_sustained_rate_and_the_first_failure() -> None:
    limit = 70.0
    measured: list[float] = []

    def measure(rate: float | None) -> dict:
        assert rate is not None
        measured.append(rate)
        ok = rate <= limit
        return _step_run(1000 if ok else 500, 10.0, [5.0] * 40, scheduled=100)

    res = sweep.sweep(measure, 10, 10.0,
                      sweep.SweepOptions([40, 60, 80, 100], refine=1, repeat=1), lambda _s: None)
    assert measured == [40, 60, 80, 70.0, 49.0]
    assert res.max_rate == 70.0 and res.max_reached
    assert res.final_rate == 49.0
    assert res.final is not None and res.final["sweep_step"]["rate"] == 49.0


def test_the_final_run_is_repeated_and_the_median_p99_is_the_one_judged() -> None:
    finals = iter([90.0, 12.0, 30.0])

    def measure(rate: float | None) -> dict:
        assert rate is not None
        p99 = 10.0 if rate == 100 else next(finals)
        return _step_run(1000, p99, [5.0] * 40, scheduled=100)

    res = sweep.sweep(measure, 10, 10.0, sweep.SweepOptions([100], repeat=3), lambda _s: None)
    assert [f["p99_ms"] for f in res.finals] == [90.0, 12.0, 30.0]
    assert res.final is not None and res.final["latency_ms"]["p99"] == 30.0
    assert [f["p99_ms"] for f in res.summary(sweep.SweepOptions([100]))["finals"]] == [
        90.0, 12.0, 30.0]


def test_the_latency_check_is_judged_on_the_run_at_seventy_percent_of_the_maximum() -> None:
    run = {"target": "chatd", "messages": {"lost": 0, "expected": 10, "duplicated": 0},
           "connect": {"failed": 0, "failures": {}}, "latency_ms": {"p99": 60.0},
           "sweep": {"final_rate": 49.0, "final_deliveries_per_s": 49000.0, "at": 0.7,
                     "max_deliveries_per_s": 70000.0, "max_reached": True}}
    results = report.checks("fan-out", [run], {"connections": 1000})
    (check,) = [c for c in results if c["name"].startswith("p99 <= 50 ms")]
    assert check["ok"] is False and "49,000 deliveries/s" in check["detail"]


def test_through_redis_the_nodes_plus_redis_are_judged_against_one_and_a_quarter() -> None:
    def run(target: str, us: float, with_redis: float | None = None) -> dict:
        server = {"cpu_us_per_delivery": us}
        if with_redis is not None:
            server["cpu_us_per_delivery_with_redis"] = with_redis
        return {"target": target, "messages": {"lost": 0, "expected": 1, "duplicated": 0},
                "connect": {"failed": 0, "failures": {}}, "latency_ms": {"p99": 1.0},
                "server": server}

    params = {"connections": 1000, "nodes": 2}
    ok = report.checks("fan-out", [run("chatd", 10.0, 12.0), run("ceiling", 10.0)], params)
    assert [c["ok"] for c in ok if "through Redis" in c["name"]] == [True]
    bad = report.checks("fan-out", [run("chatd", 10.0, 13.0), run("ceiling", 10.0)], params)
    assert [c["ok"] for c in bad if "through Redis" in c["name"]] == [False]


def test_a_quiet_check_that_does_not_wait_still_records_the_load_average() -> None:
    seen = quiet.wait_quiet(None, 0.0, [])
    assert seen["quiet"] is True and seen["waited_s"] == 0.0
    assert isinstance(seen["load1"], float)


def test_the_profile_summary_counts_self_and_inclusive_time(tmp_path: Path) -> None:
    folded = tmp_path / "p.folded"
    folded.write_text("main (a.py:1);fan (b.py:2);write (c.py:3) 3\n"
                      "main (a.py:1);fan (b.py:9) 1\n")
    text = summarize(folded)
    assert "4 samples" in text
    assert "75.0   write (c.py)" in text
    assert "100.0   fan (b.py)" in text


def test_histogram_quantiles_interpolate_within_a_bucket_like_promql() -> None:
    buckets = {0.001: 50.0, 0.01: 90.0, 0.1: 100.0, float("inf"): 100.0}
    assert stats.histogram_quantile(buckets, 50) == pytest.approx(0.001)
    assert stats.histogram_quantile(buckets, 70) == pytest.approx(0.0055)
    assert stats.histogram_quantile(buckets, 99) == pytest.approx(0.091)
    assert stats.histogram_quantile({0.1: 0.0, float("inf"): 0.0}, 99) is None


def test_close_counts_and_fan_out_buckets_are_summed_over_the_nodes() -> None:
    import http.server
    import threading

    from loadtest.servers import close_counts, fanout_buckets

    body = (b'# HELP chatd_closes_total x\nchatd_closes_total{code="4002"} 3.0\n'
            b'chatd_closes_total{code="1000"} 1.0\n'
            b'chatd_fanout_seconds_bucket{le="0.005"} 7.0\n'
            b'chatd_fanout_seconds_bucket{le="+Inf"} 9.0\n')

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    node = f"ws://127.0.0.1:{server.server_address[1]}/ws"
    try:
        assert close_counts([node, node]) == {"4002": 6, "1000": 2}
        assert fanout_buckets([node, node]) == {0.005: 14.0, float("inf"): 18.0}
    finally:
        server.shutdown()
        server.server_close()
    assert close_counts([node]) is None  # an unreadable /metrics: no figure, not a crash
