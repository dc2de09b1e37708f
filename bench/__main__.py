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
# Issue 16's targets for this 2-core box, plus the earlier history and memory ones.
TARGETS = {
    "api_cpu_ms_per_turn": ("<=", 1.3),
    "api_turns_per_second_64": (">=", 1500.0),
    "api_p99_ms_16": ("<=", 25.0),
    "sms_ack_p99_ms_at_half": ("<=", 10.0),
    "history_ratio": ("<=", 1.2),
    "bytes_per_turn": ("<=", 1024),
    # Issue 12: a 1 s bot, a burst of one turn per conversation: last reply within 3 s of the first.
    "slow_agent_spread_s": ("<=", 3.0),
}
ALL = ("ceiling", "api_turns", "sms", "email", "history", "memory", "slow_agent")
OPT_IN = ("soak",)  # long by nature: only with --scenarios


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
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench.load", name, json.dumps(cfg)],
        cwd=ROOT,
        capture_output=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise SystemExit(f"scenario {name} failed:\n{done.stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    result["wall_seconds"] = round(time.monotonic() - began, 1)
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

    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
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
        self.env.update(extra_env or {})
        self.env.pop("NATS_URL", None)
        self.env.pop("REDIS_URL", None)
        self.log = data_dir / "up.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The supervisor's pid: every process of the gateway is its descendant."""
        return self.proc.pid if self.proc else None

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
    """Run the chosen scenarios, each in its own load-generator process; results by name."""
    base = {"api": gateway.url("API_PORT"), "key": gateway.key}
    duration, warmup = args.duration, args.warmup
    limit = duration + warmup + 120
    chosen = set(args.scenarios.split(",")) if args.scenarios else set(ALL)
    results: dict[str, Any] = {}
    if "ceiling" in chosen:
        results["ceiling"] = run_scenario(
            "ceiling",
            {"url": ceiling_url, "duration": duration, "warmup": warmup, "concurrency": 16},
            limit,
        )
    if "api_turns" in chosen:
        for run in range(args.repeat):
            for connections in args.connections:
                suffix = f"_{connections}" + (f"_run{run + 1}" if run else "")
                results[f"api_turns{suffix}"] = run_scenario(
                    "api_turns",
                    {
                        **base,
                        "duration": duration,
                        "warmup": warmup,
                        "concurrency": connections,
                        "conversations": args.conversations,
                        "gateway_pid": gateway.pid,
                    },
                    limit,
                )
    if "sms" in chosen:
        results["sms"] = run_scenario(
            "sms",
            {
                "sms_url": f"{gateway.url('SMS_PORT')}/twilio/sms",
                "twilio_fake": gateway.url("TWILIO_FAKE_PORT"),
                "auth_token": "dev-auth-token",
                "account_sid": "AC00000000000000000000000000000000",
                "our_number": "+15550001111",
                "prefix": "7",
                "start_rate": args.sms_start_rate,
                "max_rate": args.sms_max_rate,
                "step_seconds": args.sms_step_seconds,
                "max_steps": args.sms_max_steps,
                "max_lag_ms": args.sms_max_lag_ms,
                "duration": duration,
            },
            limit * 10,
        )
    if "email" in chosen:
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
    if "history" in chosen:
        results["history"] = run_scenario(
            "history",
            {**base, "turns": args.history_turns, "window": 50},
            limit + args.history_turns,
        )
    if "memory" in chosen:
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
    if "slow_agent" in chosen:
        results["slow_agent"] = run_scenario(
            "slow_agent",
            {
                **base,
                "sms_url": f"{gateway.url('SMS_PORT')}/twilio/sms",
                "twilio_fake": gateway.url("TWILIO_FAKE_PORT"),
                "auth_token": "dev-auth-token",
                "account_sid": "AC00000000000000000000000000000000",
                "our_number": "+15550002222",  # routed to the slow bot, apart from the SMS scenario
                "prefix": "8",
                "bot_seconds": 1.0,
                "conversations": args.slow_conversations,
                "partitions": 16,
                "senders": args.slow_senders,
                "texts": 3,
                "gap_ms": 50,
                "gateway_pid": gateway.pid,
            },
            limit + 180,
        )
    if "soak" in chosen:
        results["soak"] = run_scenario(
            "soak",
            {
                **base,
                "nats_url": f"nats://127.0.0.1:{gateway.ports['NATS_PORT']}",
                "redis_url": f"redis://127.0.0.1:{gateway.ports['REDIS_PORT']}/0",
                "gateway_pid": gateway.pid,
                "duration": args.soak_seconds,
                "concurrency": 64,
                "conversations": args.conversations,
            },
            args.soak_seconds + 120,
        )
    return results


def api_runs(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in results.items() if k.startswith("api_turns_")}


def summarize(results: dict[str, Any]) -> dict[str, float]:
    """The numbers the targets are about (only for the scenarios that ran)."""
    ratios: dict[str, float] = {}
    runs = api_runs(results)
    if runs:
        # The cost at scale is the worst of the runs: batching at high concurrency must not hide
        # what a turn costs at low concurrency.
        ratios["api_cpu_ms_per_turn"] = max(r["cpu"]["ms_per_op"] for r in runs.values())
        if "api_turns_64" in runs:
            ratios["api_turns_per_second_64"] = runs["api_turns_64"]["per_second"]
        if "api_turns_16" in runs:
            ratios["api_p99_ms_16"] = runs["api_turns_16"]["latency"].get("p99_ms", float("nan"))
        ceiling_rps = results.get("ceiling", {}).get("per_second")
        if ceiling_rps:
            best = max(r["per_second"] for r in runs.values())
            ratios["api_to_ceiling"] = round(best / ceiling_rps, 3)
    if "sms" in results:
        ratios["sms_capacity_per_second"] = results["sms"]["capacity_per_second"]
        ratios["sms_ack_p99_ms_at_half"] = results["sms"]["at_half"]["ack"].get(
            "p99_ms", float("nan")
        )
    if "history" in results:
        ratios["history_ratio"] = results["history"]["ratio"]
    if "memory" in results:
        ratios["bytes_per_turn"] = results["memory"]["bytes_per_turn"]
    if "slow_agent" in results:
        ratios["slow_agent_spread_s"] = results["slow_agent"]["burst"]["spread_s"]
    return ratios


def verdict(ratios: dict[str, float], name: str) -> str:
    if name not in ratios:
        return ""
    op, target = TARGETS[name]
    value = ratios[name]
    met = value >= target if op == ">=" else value <= target
    return f"{'met' if met else 'NOT met'} (target {op} {target:g})"


def table(results: dict[str, Any], ratios: dict[str, float]) -> str:
    rows: list[tuple[Any, ...]] = [("scenario", "throughput", "p50 ms", "p99 ms", "notes")]
    if "ceiling" in results:
        c = results["ceiling"]
        rows.append(
            (
                "ceiling (bare Litestar+msgspec)",
                f"{c['per_second']}/s",
                c["latency"].get("p50_ms"),
                c["latency"].get("p99_ms"),
                f"concurrency {c['concurrency']}",
            )
        )
    for a in api_runs(results).values():
        cpu = a["cpu"]
        top = ", ".join(f"{p} {ms}" for p, ms in list(cpu["by_process"].items())[:5])
        rows.append(
            (
                f"API sync turn, {a['concurrency']} conns",
                f"{a['per_second']}/s",
                a["latency"].get("p50_ms"),
                a["latency"].get("p99_ms"),
                f"{cpu['ms_per_op']} CPU-ms/turn ({top}); {cpu['cores_busy']} cores busy; "
                f"{a['conversations']} conversations{'; errors ' + str(a['errors']) if a['errors'] else ''}",
            )
        )
    if api_runs(results):
        rows.append(
            (
                "  API targets",
                "",
                "",
                "",
                "; ".join(
                    f"{n} {ratios[n]}: {verdict(ratios, n)}"
                    for n in ("api_cpu_ms_per_turn", "api_turns_per_second_64", "api_p99_ms_16")
                    if n in ratios
                ),
            )
        )
    if "sms" in results:
        s = results["sms"]
        half = s["at_half"]
        steps = " ".join(f"{st['rate']:g}{'✓' if st['kept_up'] else '✗'}" for st in s["steps"])
        rows.append(
            (
                "SMS new conversations, sustained",
                f"{s['capacity_per_second']:g}/s",
                "",
                "",
                f"steps of {s['step_seconds']:g} s: {steps} (✓ = all replied, reply p99 ≤ "
                f"{s['max_lag_ms']:g} ms)",
            )
        )
        rows.append(
            (
                f"SMS webhook ack at {half['rate']:g}/s",
                f"{half['achieved_rate']}/s offered",
                half["ack"].get("p50_ms"),
                half["ack"].get("p99_ms"),
                f"{verdict(ratios, 'sms_ack_p99_ms_at_half')}; errors {half['errors'] or 0}",
            )
        )
        egress = half["turn_to_egress"]
        rows.append(
            (
                f"SMS turn → egress at {half['rate']:g}/s",
                f"{egress['replied']}/{egress['of']} replied",
                egress["latency"].get("p50_ms"),
                egress["latency"].get("p99_ms"),
                "webhook due → Twilio fake receives the reply",
            )
        )
    if "email" in results:
        e = results["email"]
        rows.append(
            (
                "email ingest (SMTP)",
                f"{e['per_second']}/s",
                e["accept_latency"].get("p50_ms"),
                e["accept_latency"].get("p99_ms"),
                f"{e['accepted']}/{e['sent']} accepted, {e['replies_relayed']} replies relayed",
            )
        )
    if "history" in results:
        h = results["history"]
        rows.append(
            (
                "history growth",
                f"turn {h['turns']} vs turn 1",
                h["first_turns_p50_ms"],
                h["last_turns_p50_ms"],
                f"ratio {h['ratio']} — {verdict(ratios, 'history_ratio')} (p50 of {h['window']} "
                f"turns 1 vs {h['window']} turns ≥{h['turns'] - h['window'] + 1}, interleaved)",
            )
        )
    if "memory" in results:
        m = results["memory"]
        rows.append(
            (
                "Valkey memory",
                f"{m['bytes_per_conversation']} B/conversation",
                "",
                "",
                f"{m['bytes_per_turn']} B/turn — {verdict(ratios, 'bytes_per_turn')}",
            )
        )
    if "slow_agent" in results:
        b, t = results["slow_agent"]["burst"], results["slow_agent"]["texting"]
        rows.append(
            (
                f"slow agent ({results['slow_agent']['bot_seconds']:g} s bot), burst",
                f"{b['answered']}/{b['conversations']} answered",
                "",
                "",
                f"first reply {b['first_reply_s']} s, last {b['last_reply_s']} s: spread "
                f"{b['spread_s']} s — {verdict(ratios, 'slow_agent_spread_s')} (one at a time per "
                f"partition would need ~{b['one_at_a_time_per_partition_s']} s)",
            )
        )
        rows.append(
            (
                f"slow agent, {t['senders']} phones × {t['texts_each']} texts {t['gap_ms']} ms apart",
                f"{t['replies']}/{t['of']} replied",
                "",
                "",
                f"{t['senders_in_order']}/{t['senders']} senders' replies in order; all replied "
                f"after {t['all_replied_s']} s{'; errors ' + str(t['errors']) if t['errors'] else ''}",
            )
        )
    if "soak" in results:
        k = results["soak"]
        stored, rss = k["jetstream_stored_bytes"], k["nats_rss_mb"]
        rows.append(
            (
                f"soak, {k['seconds']:g} s of API turns",
                f"{k['turns']} turns",
                "",
                "",
                f"JetStream stored bytes start/max/end {stored['start']}/{stored['max']}/"
                f"{stored['end']}; nats-server RSS {rss['start']}/{rss['max']}/{rss['end']} MB; "
                f"Valkey {k['valkey_bytes_per_turn']} B/turn",
            )
        )
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
    parser.add_argument("--duration", type=float, default=15, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of warm-up per run")
    parser.add_argument(
        "--connections",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[16, 64],
        help="API connections per run, comma-separated (closed loops)",
    )
    parser.add_argument("--conversations", type=int, default=200, help="API conversations")
    parser.add_argument("--repeat", type=int, default=1, help="API runs per connection count")
    parser.add_argument("--sms-start-rate", type=float, default=25, help="first SMS step, /s")
    parser.add_argument("--sms-max-rate", type=float, default=1600, help="last SMS step, /s")
    parser.add_argument("--sms-step-seconds", type=float, default=8, help="seconds per SMS step")
    parser.add_argument("--sms-max-steps", type=int, default=8)
    parser.add_argument(
        "--sms-max-lag-ms", type=float, default=2000, help="reply p99 lag that still keeps up"
    )
    parser.add_argument("--emails", type=int, default=1000, help="messages sent over SMTP")
    parser.add_argument("--history-turns", type=int, default=1000, help="turns in one conversation")
    parser.add_argument("--memory-conversations", type=int, default=200)
    parser.add_argument(
        "--slow-conversations", type=int, default=400, help="slow agent: conversations in the burst"
    )
    parser.add_argument("--slow-senders", type=int, default=50, help="slow agent: phones texting")
    parser.add_argument("--soak-seconds", type=float, default=300, help="length of the soak")
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated subset of {','.join(ALL)} (default: all), or {','.join(OPT_IN)}",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the gateway's processes (repeatable), e.g. "
        "SWITCHBOARD_DUPLICATE_WINDOW_SECONDS=60",
    )
    parser.add_argument("--out", type=Path, help="JSON report (default: .switchboard/bench/…)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.emails = 0.8, 0.2, 20
        args.conversations, args.history_turns, args.memory_conversations = 64, 60, 4
        args.sms_start_rate, args.sms_step_seconds, args.sms_max_steps = 10, 0.5, 2
        args.slow_conversations, args.slow_senders = 40, 5
    started = datetime.now(UTC)
    out = args.out or ROOT / ".switchboard" / "bench" / f"{started:%Y%m%dT%H%M%SZ}.json"
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as scratch:
        gateway = Gateway(Path(scratch), dict(kv.split("=", 1) for kv in args.gateway_env))
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
        "verdicts": {k: verdict(ratios, k) for k in TARGETS if k in ratios},
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
