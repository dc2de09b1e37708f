"""The benchmark runs end to end (tiny sizes): every scenario produces its numbers. Speed itself
is never asserted here; `docs/performance.md` holds the measured table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_the_quick_benchmark_reports_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {
        "ceiling",
        "api_turns_16",
        "api_turns_64",
        "sms",
        "email",
        "history",
        "memory",
        "slow_agent",
    }
    assert results["ceiling"]["latency"]["count"] > 0
    for connections in (16, 64):
        run = results[f"api_turns_{connections}"]
        assert run["concurrency"] == connections
        assert run["conversations"] >= connections
        assert run["latency"]["count"] > 0
        assert run["errors"] == {}
        # CPU is counted in every process of the gateway, the servers included.
        spent = run["cpu"]["by_process"]
        assert {"core", "api", "egress", "nats-server", "valkey-server"} <= set(spent)
        assert spent["core"] > 0
        assert spent["nats-server"] > 0
        assert run["cpu"]["ms_per_op"] >= sum(spent.values()) - 0.01
    sms = results["sms"]
    assert sms["steps"]
    assert sms["steps"][0]["rate"] == 10
    assert sms["capacity_per_second"] == max(
        (s["rate"] for s in sms["steps"] if s["kept_up"]), default=0
    )
    half = sms["at_half"]
    assert half["errors"] == {}
    assert half["turn_to_egress"]["replied"] == half["sent"]
    assert results["email"]["accepted"] == results["email"]["sent"]
    assert results["email"]["replies_relayed"] == results["email"]["sent"]
    assert results["history"]["turns"] >= 60
    assert results["history"]["window"] == 50
    assert results["memory"]["bytes_per_turn"] > 0
    burst, texting = results["slow_agent"]["burst"], results["slow_agent"]["texting"]
    assert burst["answered"] == burst["conversations"] == 40
    assert burst["errors"] == {}
    assert texting["replies"] == texting["of"] == 15
    assert texting["senders_in_order"] == texting["senders"]
    assert {
        "api_cpu_ms_per_turn",
        "api_turns_per_second_64",
        "api_p99_ms_16",
        "sms_capacity_per_second",
        "sms_ack_p99_ms_at_half",
        "history_ratio",
        "bytes_per_turn",
        "slow_agent_spread_s",
    } <= set(report["ratios"])
    printed = done.stdout.decode()
    assert "API sync turn, 64 conns" in printed
    assert "CPU-ms/turn" in printed
    assert "share the same" in printed  # the report says server and load share the cores
