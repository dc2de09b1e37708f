"""The `switchboard` command.

switchboard up [--external]   run embedded NATS + Valkey and every service; Ctrl-C stops all.
    Every port is checked free first and every listener checked to be the process just started
    (else exit 1, naming the port and its variable); a process that dies later is restarted with
    backoff; notable events that services log (a `console` field) are printed under the banner.
switchboard <service>         run one service in the foreground (core, egress, api)
switchboard dead list | replay <id> | replay --all   the DEAD stream
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.supervisor.embedded import ChildProcess, StartError, start_nats, start_valkey
from services.supervisor.ports import Port, check_free, listens


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    port_variable: str
    default_port: int
    what: str
    # Further ports it listens on: (variable, default, what).
    more_ports: tuple[tuple[str, int, str], ...] = ()

    def port(self, env: dict[str, str]) -> int:
        return int(env.get(self.port_variable, self.default_port))

    def ports(self, env: dict[str, str]) -> list[Port]:
        return [
            Port(int(env.get(variable, default)), variable, what)
            for variable, default, what in (
                (self.port_variable, self.default_port, f"{self.name}: {self.what}"),
                *self.more_ports,
            )
        ]


# In start order: core first, so the streams and the demo agent exist when ingress opens.
SERVICES = (
    ServiceSpec("core", "SWITCHBOARD_CORE_HEALTH_PORT", 8090, "conversation core (probes)"),
    ServiceSpec("egress", "SWITCHBOARD_EGRESS_HEALTH_PORT", 8091, "egress workers (probes)"),
    ServiceSpec("api", "SWITCHBOARD_API_PORT", 8080, "HTTP API"),
    ServiceSpec("sms", "SWITCHBOARD_SMS_PORT", 8081, "Twilio SMS webhooks"),
    ServiceSpec(
        "email",
        "SWITCHBOARD_EMAIL_HEALTH_PORT",
        8092,
        "inbound SMTP (probes)",
        (("SWITCHBOARD_SMTP_PORT", 2525, "email: inbound SMTP"),),
    ),
    ServiceSpec("voice", "SWITCHBOARD_VOICE_PORT", 8082, "Twilio Voice webhooks"),
)
TWILIO_FAKE = ServiceSpec(
    "twilio_fake",
    "SWITCHBOARD_TWILIO_FAKE_PORT",
    8099,
    "local Twilio REST fake (no Twilio credentials set)",
)


def say(message: str) -> None:
    print(message, flush=True)


def wait_ready(url: str, child: ChildProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise StartError(f"{child.name} exited with {child.proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise StartError(f"{child.name} not ready after {timeout:.0f}s ({last})")


def verify_listener(child: ChildProcess, ports: list[Port], timeout: float = 5.0) -> None:
    """The process answering on each port must be the one just started, not a leftover."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while not listens(child.proc.pid, port.number):
            if child.proc.poll() is not None:
                raise StartError(f"{child.name} exited with {child.proc.returncode}")
            if time.monotonic() > deadline:
                raise StartError(
                    f"port {port.number} ({port.what}) answers, but not from the {child.name} "
                    f"just started: another process holds it; set {port.variable}"
                )
            time.sleep(0.05)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Managed:
    """A server or service `up` keeps running: started, verified, and restarted after a crash with
    a delay that doubles per crash in a row (reset once it has stayed up a minute)."""

    name: str
    launch: Callable[[], ChildProcess]  # starts it and returns once it is ready and verified
    child: ChildProcess
    log_offset: int = 0
    crashes_in_a_row: int = 0
    started_at: float = field(default_factory=time.monotonic)
    restart_at: float | None = None

    def console_lines(self) -> list[str]:
        """New log lines that carry a `console` field: the notable events `up` prints."""
        try:
            with open(self.child.log_path, "rb") as log:
                log.seek(self.log_offset)
                chunk = log.read()
        except OSError:
            return []
        complete = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next look
        self.log_offset += complete
        lines = []
        for raw in chunk[:complete].splitlines():
            if not raw.startswith(b"{") or b'"console"' not in raw:
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("console"):
                lines.append(str(entry["console"]))
        return lines


def restart_delay(base: float, crashes_in_a_row: int) -> float:
    return float(min(base * 2 ** (crashes_in_a_row - 1), 60.0))


def up(external: bool) -> int:
    env = dict(os.environ)
    host = env.get("SWITCHBOARD_HOST", "127.0.0.1")
    data_dir = Path(env.get("SWITCHBOARD_DATA_DIR", "./.switchboard")).resolve()
    logs = data_dir / "logs"
    restart_base = float(env.get("SWITCHBOARD_RESTART_BACKOFF_SECONDS", "1"))
    managed: list[Managed] = []
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    def keep(name: str, launch: Callable[[], ChildProcess]) -> None:
        child = launch()
        managed.append(Managed(name, launch, child, log_offset=child.log_start))

    try:
        specs = list(SERVICES)
        if "SWITCHBOARD_TWILIO_AUTH_TOKEN" not in env:
            # No Twilio account: replies go to a local fake so an SMS round trip still works.
            env["SWITCHBOARD_TWILIO_BASE_URL"] = f"http://{host}:{TWILIO_FAKE.port(env)}"
            specs.insert(0, TWILIO_FAKE)
        needed = [port for spec in specs for port in spec.ports(env)]
        if external:
            for variable in ("NATS_URL", "REDIS_URL"):
                if variable not in env:
                    raise StartError(f"--external needs {variable}")
        else:
            nats_port = Port(
                int(env.get("SWITCHBOARD_NATS_PORT", 4222)),
                "SWITCHBOARD_NATS_PORT",
                "embedded nats-server",
            )
            redis_port = Port(
                int(env.get("SWITCHBOARD_REDIS_PORT", 6379)),
                "SWITCHBOARD_REDIS_PORT",
                "embedded valkey-server",
            )
            needed = [nats_port, redis_port, *needed]
        problems = check_free(host, needed)
        if problems:
            for problem in problems:
                say(f"error: {problem}")
            raise StartError(f"{len(problems)} port(s) in use; nothing was started")
        if external:
            say(f"using external NATS at {env['NATS_URL']} and Redis at {env['REDIS_URL']}")
        else:
            say(f"starting embedded servers (data in {data_dir})")

            def valkey() -> ChildProcess:
                child = start_valkey(data_dir, host, redis_port.number)
                verify_listener(child, [redis_port])
                return child

            def nats() -> ChildProcess:
                child = start_nats(data_dir, host, nats_port.number)
                verify_listener(child, [nats_port])
                return child

            keep("valkey-server", valkey)
            say(f"  ✓ valkey-server  redis://{host}:{redis_port.number}  (AOF on)")
            keep("nats-server", nats)
            say(f"  ✓ nats-server    nats://{host}:{nats_port.number}  (JetStream, file storage)")
            env["NATS_URL"] = f"nats://{host}:{nats_port.number}"
            env["REDIS_URL"] = f"redis://{host}:{redis_port.number}/0"
        key = env.setdefault("SWITCHBOARD_BOOTSTRAP_API_KEY", "sk_dev_" + secrets.token_urlsafe(18))
        say("starting services")
        for spec in specs:
            keep(spec.name, service_launcher(spec, env, host, logs))
            say(f"  ✓ {spec.name:<11} http://{host}:{spec.port(env)}  {spec.what}")
        api = f"http://{host}:{SERVICES[2].port(env)}"
        sms = f"http://{host}:{SERVICES[3].port(env)}"
        say(f"""
Switchboard is up. Logs: {logs}
  API            {api}   (OpenAPI: {api}/schema)
  Console        {api}/console   (sign in with an operator or admin key)
  SMS webhooks   {sms}/twilio/sms   status: {sms}/twilio/sms/status
  Voice webhook  http://{host}:{env.get("SWITCHBOARD_VOICE_PORT", "8082")}/twilio/voice   status: …/twilio/voice/status
  SMTP           {host}:{env.get("SWITCHBOARD_SMTP_PORT", "2525")} for @{env.get("SWITCHBOARD_EMAIL_DOMAINS", "switchboard.localhost")}; replies relay via {env.get("SWITCHBOARD_SMTP_RELAY_HOST", "127.0.0.1")}:{env.get("SWITCHBOARD_SMTP_RELAY_PORT", "1025")}
  Twilio REST    {env.get("SWITCHBOARD_TWILIO_BASE_URL", "https://api.twilio.com")}
  bootstrap key  {key}

Try it:
  curl -s -X POST {api}/v1/conversations -H 'x-api-key: {key}' -H 'content-type: application/json' -d '{{}}'
  curl -s -X POST {api}/v1/conversations/<id>/turns -H 'x-api-key: {key}' \\
       -H 'content-type: application/json' -d '{{"user_message": "how long do refunds take?"}}'

Press Ctrl-C to stop. Notable events (restarts, dead letters, provider outages) show below.""")
        while not stopping:
            for m in managed:
                if stopping:
                    break  # Ctrl-C reaches the children too: their exit is not a crash
                watch(m, restart_base)
            time.sleep(0.2)
        return_code = 0
    except StartError as exc:
        say(f"error: {exc}")
        return_code = 1
    finally:
        say("stopping…")
        for m in reversed(managed):
            m.child.stop()
            say(f"  stopped {m.name}")
    return return_code


def service_launcher(
    spec: ServiceSpec, env: dict[str, str], host: str, logs: Path
) -> Callable[[], ChildProcess]:
    def launch() -> ChildProcess:
        child = ChildProcess(
            spec.name,
            [sys.executable, "-m", f"services.{spec.name}"],
            logs / f"{spec.name}.log",
            env=env,
        )
        try:
            probe = "healthz" if spec is TWILIO_FAKE else "readyz"
            wait_ready(f"http://{host}:{spec.port(env)}/{probe}", child, 30)
            verify_listener(child, spec.ports(env))
        except StartError:
            child.stop()
            say(tail(child.log_path))
            raise
        return child

    return launch


def watch(m: Managed, restart_base: float) -> None:
    """Print what the process logged as notable; restart it (after its delay) if it died."""
    stamp = time.strftime("%H:%M:%S")
    for line in m.console_lines():
        say(f"{stamp} {m.name}: {line}")
    now = time.monotonic()
    if m.restart_at is None:
        code = m.child.proc.poll()
        if code is None:
            if now - m.started_at > 60:
                m.crashes_in_a_row = 0
            return
        m.crashes_in_a_row += 1
        delay = restart_delay(restart_base, m.crashes_in_a_row)
        m.restart_at = now + delay
        m.child.stop()  # closes its log
        say(
            f"{stamp} ! {m.name} exited unexpectedly (code {code}); restarting in {delay:g}s "
            f"(crash {m.crashes_in_a_row} in a row)\n{tail(m.child.log_path, 5)}"
        )
        return
    if now < m.restart_at:
        return
    try:
        m.child = m.launch()
    except StartError as exc:
        m.crashes_in_a_row += 1
        delay = restart_delay(restart_base, m.crashes_in_a_row)
        m.restart_at = time.monotonic() + delay
        say(f"{stamp} ! {m.name} did not come back ({exc}); trying again in {delay:g}s")
        return
    m.restart_at = None
    m.started_at = time.monotonic()
    m.log_offset = m.child.log_start
    say(f"{time.strftime('%H:%M:%S')} ✓ {m.name} restarted (pid {m.child.proc.pid})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="switchboard",
        description="Switchboard: SMS, voice, email and HTTP conversations in one gateway.",
        epilog="Settings come from SWITCHBOARD_* environment variables (see README).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up_parser = commands.add_parser("up", help="run embedded NATS + Valkey and every service")
    up_parser.add_argument(
        "--external",
        action="store_true",
        help="use NATS_URL and REDIS_URL instead of embedded servers",
    )
    for spec in (*SERVICES, TWILIO_FAKE):
        commands.add_parser(spec.name, help=f"run the {spec.what} alone")
    streams_parser = commands.add_parser(
        "streams", help="print the JetStream stream names and subjects (or migrate them)"
    )
    streams_parser.add_argument(
        "action",
        nargs="?",
        choices=["migrate"],
        help="recreate streams an earlier version made with another retention, once drained",
    )
    dead = commands.add_parser("dead", help="list or replay what is in the DEAD stream")
    dead_actions = dead.add_subparsers(dest="dead_action", required=True, metavar="ACTION")
    dead_list = dead_actions.add_parser("list", help="every dead letter, its reason and state")
    dead_list.add_argument("--json", action="store_true", help="as JSON, with payloads")
    dead_replay = dead_actions.add_parser(
        "replay", help="put a dead letter back on its subject (at most once)"
    )
    which = dead_replay.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", help="the dead letter's id (dead_…)")
    which.add_argument("--all", action="store_true", help="every one not yet replayed")
    args = parser.parse_args(argv)
    if args.command == "dead":
        from services.supervisor import dead as dead_letters

        return dead_letters.run(
            args.dead_action,
            getattr(args, "id", None),
            getattr(args, "all", False),
            getattr(args, "json", False),
        )
    if args.command == "up":
        return up(args.external)
    if args.command == "streams":
        if args.action == "migrate":
            from services.supervisor.streams import migrate_streams

            return migrate_streams(say)
        from shared.streams import stream_configs
        from shared.subjects import Subjects

        configs = stream_configs(Subjects(os.environ.get("SWITCHBOARD_NAMESPACE", "")), 1)
        say(json.dumps({c.name: c.subjects for c in configs}, indent=2))
        return 0
    runpy.run_module(f"services.{args.command}", run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
