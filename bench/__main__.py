"""`python -m bench`: start the gateway, measure it against its own ceiling, print a table, write JSON.

The gateway runs exactly as `switchboard up` runs it (embedded nats-server and valkey-server, each
service its own process, the local Twilio fake). The ceiling is a bare Litestar endpoint served the
same way. The load generator is a separate process per scenario. Everything shares this machine's
cores, so the ratios are the numbers to compare between runs; absolute numbers move with the host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.supervisor.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "api_to_ceiling": (">=", 0.35),
    "sms_ack_p99_ms": ("<=", 10.0),
    "history_ratio": ("<=", 1.2),
    "bytes_per_turn": ("<=", 1024),
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} not ready after {timeout:.0f}s")


def run_scenario(name: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    say(f"  running {name} …")
    done = subprocess.run(
        [sys.executable, "-m", "bench.load", name, json.dumps(cfg)],
        cwd=ROOT,
        capture_output=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise SystemExit(f"scenario {name} failed:\n{done.stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "note": "gateway processes, nats-server, valkey-server and the load generator share these cores",
    }


class Gateway:
    """`switchboard up` in a scratch data directory on free ports."""

    def __init__(self, data_dir: Path) -> None:
        names = [
            "NATS_PORT",
            "REDIS_PORT",
            "API_PORT",
            "SMS_PORT",
            "VOICE_PORT",
            "SMTP_PORT",
            "EMAIL_HEALTH_PORT",
            "CORE_HEALTH_PORT",
            "EGRESS_HEALTH_PORT",
            "TWILIO_FAKE_PORT",
            "SMTP_RELAY_PORT",
        ]
        self.ports = {name: free_port() for name in names}
        self.key = "sk_bench_" + secrets.token_urlsafe(12)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")},
            **{f"SWITCHBOARD_{name}": str(port) for name, port in self.ports.items()},
            "SWITCHBOARD_DATA_DIR": str(data_dir),
            "SWITCHBOARD_BOOTSTRAP_API_KEY": self.key,
            # Limits stay checked (their cost is part of every request) but never bind: one bench
            # key and a few end users send far more than any real client would.
            "SWITCHBOARD_RATE_LIMIT_PER_KEY_PER_SECOND": "1000000",
            "SWITCHBOARD_RATE_LIMIT_TURNS_PER_END_USER_PER_MINUTE": "1000000",
            "SWITCHBOARD_RATE_LIMIT_SMS_PER_SENDER_PER_MINUTE": "1000000",
        }
        self.env.pop("NATS_URL", None)
        self.env.pop("REDIS_URL", None)
        self.log = data_dir / "up.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, port: str) -> str:
        return f"http://127.0.0.1:{self.ports[port]}"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "wb")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.supervisor", "up"],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        for port in ("API_PORT", "SMS_PORT", "EMAIL_HEALTH_PORT", "EGRESS_HEALTH_PORT"):
            wait_http(f"{self.url(port)}/readyz", self.proc, "switchboard up", timeout=90)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def measure(args: argparse.Namespace, gateway: Gateway, ceiling_url: str) -> dict[str, Any]:
    base = {"api": gateway.url("API_PORT"), "key": gateway.key}
    duration, warmup, conc = args.duration, args.warmup, args.concurrency
    limit = duration + warmup + 120
    results: dict[str, Any] = {}
    results["ceiling"] = run_scenario(
        "ceiling",
        {"url": ceiling_url, "duration": duration, "warmup": warmup, "concurrency": conc},
        limit,
    )
    results["api_turns"] = run_scenario(
        "api_turns", {**base, "duration": duration, "warmup": warmup, "concurrency": conc}, limit
    )
    results["sms"] = run_scenario(
        "sms",
        {
            "sms_url": f"{gateway.url('SMS_PORT')}/twilio/sms",
            "twilio_fake": gateway.url("TWILIO_FAKE_PORT"),
            "auth_token": "dev-auth-token",
            "account_sid": "AC00000000000000000000000000000000",
            "our_number": "+15550001111",
            "rate": args.sms_rate,
            "duration": duration,
            "prefix": "7",
        },
        limit,
    )
    results["email"] = run_scenario(
        "email",
        {
            "smtp_port": gateway.ports["SMTP_PORT"],
            "relay_port": gateway.ports["SMTP_RELAY_PORT"],
            "to": "support@switchboard.localhost",
            "count": args.emails,
            "connections": 4,
            "prefix": secrets.token_hex(3),
        },
        limit,
    )
    results["history"] = run_scenario(
        "history", {**base, "turns": args.history_turns, "window": 50}, limit + args.history_turns
    )
    results["memory"] = run_scenario(
        "memory",
        {
            **base,
            "redis_url": f"redis://127.0.0.1:{gateway.ports['REDIS_PORT']}/0",
            "conversations": args.memory_conversations,
            "turns": 10,
        },
        limit + args.memory_conversations,
    )
    return results


def summarize(results: dict[str, Any]) -> dict[str, float]:
    ceiling_rps = results["ceiling"]["per_second"]
    return {
        "api_to_ceiling": round(results["api_turns"]["per_second"] / ceiling_rps, 3)
        if ceiling_rps
        else 0.0,
        "sms_ack_p99_ms": results["sms"]["ack"].get("p99_ms", float("nan")),
        "history_ratio": results["history"]["ratio"],
        "bytes_per_turn": results["memory"]["bytes_per_turn"],
    }


def verdict(name: str, value: float) -> str:
    op, target = TARGETS[name]
    met = value >= target if op == ">=" else value <= target
    return f"{'met' if met else 'NOT met'} (target {op} {target:g})"


def table(results: dict[str, Any], ratios: dict[str, float]) -> str:
    c, a, s = results["ceiling"], results["api_turns"], results["sms"]
    e, h, m = results["email"], results["history"], results["memory"]
    egress = s["turn_to_egress"]
    rows = [
        ("scenario", "throughput", "p50 ms", "p99 ms", "notes"),
        (
            "ceiling (bare Litestar+msgspec)",
            f"{c['per_second']}/s",
            c["latency"].get("p50_ms"),
            c["latency"].get("p99_ms"),
            f"concurrency {c['concurrency']}",
        ),
        (
            "API sync turn",
            f"{a['per_second']}/s",
            a["latency"].get("p50_ms"),
            a["latency"].get("p99_ms"),
            f"{ratios['api_to_ceiling']} × ceiling — {verdict('api_to_ceiling', ratios['api_to_ceiling'])}",
        ),
        (
            "SMS webhook ack",
            f"{s['achieved_rate']}/s offered",
            s["ack"].get("p50_ms"),
            s["ack"].get("p99_ms"),
            f"{verdict('sms_ack_p99_ms', ratios['sms_ack_p99_ms'])}; errors {s['errors'] or 0}",
        ),
        (
            "SMS turn → egress",
            f"{egress['replied']}/{egress['of']} replied",
            egress["latency"].get("p50_ms"),
            egress["latency"].get("p99_ms"),
            "webhook due → Twilio fake receives the reply",
        ),
        (
            "email ingest (SMTP)",
            f"{e['per_second']}/s",
            e["accept_latency"].get("p50_ms"),
            e["accept_latency"].get("p99_ms"),
            f"{e['accepted']}/{e['sent']} accepted, {e['replies_relayed']} replies relayed",
        ),
        (
            "history growth",
            f"turn {h['turns']} vs turn 1",
            h["first_turns_p50_ms"],
            h["last_turns_p50_ms"],
            f"ratio {h['ratio']} — {verdict('history_ratio', h['ratio'])} (p50 of {h['window']} turns 1 vs {h['window']} turns ≥{h['turns'] - h['window'] + 1}, interleaved)",
        ),
        (
            "Valkey memory",
            f"{m['bytes_per_conversation']} B/conversation",
            "",
            "",
            f"{m['bytes_per_turn']} B/turn — {verdict('bytes_per_turn', m['bytes_per_turn'])}",
        ),
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    lines = []
    for index, row in enumerate(rows):
        cells = [str(cell).ljust(widths[i]) for i, cell in enumerate(row[:4])]
        lines.append("  ".join([*cells, str(row[4])]))
        if index == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15, help="seconds measured per scenario")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of warm-up per scenario")
    parser.add_argument("--concurrency", type=int, default=16, help="clients in closed loops")
    parser.add_argument("--sms-rate", type=float, default=200, help="SMS webhooks per second")
    parser.add_argument("--emails", type=int, default=1000, help="messages sent over SMTP")
    parser.add_argument("--history-turns", type=int, default=1000, help="turns in one conversation")
    parser.add_argument("--memory-conversations", type=int, default=200)
    parser.add_argument("--out", type=Path, help="JSON report (default: .switchboard/bench/…)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.sms_rate, args.emails = 1.0, 0.2, 20, 20
        args.history_turns, args.memory_conversations = 60, 4
    started = datetime.now(UTC)
    out = args.out or ROOT / ".switchboard" / "bench" / f"{started:%Y%m%dT%H%M%SZ}.json"
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as scratch:
        gateway = Gateway(Path(scratch))
        ceiling_port = free_port()
        ceiling = subprocess.Popen(
            [sys.executable, "-m", "bench.ceiling", str(ceiling_port)],
            cwd=ROOT,
            env={**os.environ, "SWITCHBOARD_LOG_LEVEL": "WARNING"},
        )
        try:
            say("starting the gateway (switchboard up) and the ceiling server")
            gateway.start()
            wait_http(f"http://127.0.0.1:{ceiling_port}/healthz", ceiling, "ceiling")
            results = measure(args, gateway, f"http://127.0.0.1:{ceiling_port}")
        finally:
            ceiling.send_signal(signal.SIGINT)
            gateway.stop()
            ceiling.wait(30)
    ratios = summarize(results)
    report: dict[str, Any] = {
        "started_at": started.isoformat(),
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "ratios": ratios,
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    m = report["machine"]
    print(f"\nSwitchboard benchmark — {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}")
    print(f"server and load generator share the same {m['cpus']} cores\n")
    print(table(results, ratios))
    print(f"\nJSON report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
