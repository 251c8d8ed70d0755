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

from loadtest import report, scenarios, stats
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
    assert plan.slow_at == p.duration / 2


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
