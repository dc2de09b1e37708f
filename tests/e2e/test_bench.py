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
    assert set(results) == {"ceiling", "api_turns", "sms", "email", "history", "memory"}
    assert results["ceiling"]["latency"]["count"] > 0
    assert results["api_turns"]["latency"]["count"] > 0
    assert results["api_turns"]["errors"] == {}
    assert results["sms"]["errors"] == {}
    assert results["sms"]["turn_to_egress"]["replied"] == results["sms"]["sent"]
    assert results["email"]["accepted"] == results["email"]["sent"]
    assert results["email"]["replies_relayed"] == results["email"]["sent"]
    assert results["history"]["turns"] >= 60
    assert results["history"]["window"] == 50
    assert results["memory"]["bytes_per_turn"] > 0
    assert set(report["ratios"]) == {
        "api_to_ceiling",
        "sms_ack_p99_ms",
        "history_ratio",
        "bytes_per_turn",
    }
    printed = done.stdout.decode()
    assert "API sync turn" in printed
    assert "share the same" in printed  # the report says server and load share the cores
