"""The `switchboard` command.

switchboard up [--external]   run embedded NATS + Valkey and every service; Ctrl-C stops all
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
from dataclasses import dataclass
from pathlib import Path

from services.supervisor.embedded import ChildProcess, StartError, start_nats, start_valkey


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    port_variable: str
    default_port: int
    what: str

    def port(self, env: dict[str, str]) -> int:
        return int(env.get(self.port_variable, self.default_port))


# In start order: core first, so the streams and the demo agent exist when ingress opens.
SERVICES = (
    ServiceSpec("core", "SWITCHBOARD_CORE_HEALTH_PORT", 8090, "conversation core (probes)"),
    ServiceSpec("egress", "SWITCHBOARD_EGRESS_HEALTH_PORT", 8091, "egress workers (probes)"),
    ServiceSpec("api", "SWITCHBOARD_API_PORT", 8080, "HTTP API"),
    ServiceSpec("sms", "SWITCHBOARD_SMS_PORT", 8081, "Twilio SMS webhooks"),
    ServiceSpec("email", "SWITCHBOARD_EMAIL_HEALTH_PORT", 8092, "inbound SMTP (probes)"),
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


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def up(external: bool) -> int:
    env = dict(os.environ)
    host = env.get("SWITCHBOARD_HOST", "127.0.0.1")
    data_dir = Path(env.get("SWITCHBOARD_DATA_DIR", "./.switchboard")).resolve()
    logs = data_dir / "logs"
    children: list[ChildProcess] = []
    servers: list[ChildProcess] = []
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    try:
        if external:
            for variable in ("NATS_URL", "REDIS_URL"):
                if variable not in env:
                    raise StartError(f"--external needs {variable}")
            say(f"using external NATS at {env['NATS_URL']} and Redis at {env['REDIS_URL']}")
        else:
            nats_port = int(env.get("SWITCHBOARD_NATS_PORT", 4222))
            redis_port = int(env.get("SWITCHBOARD_REDIS_PORT", 6379))
            say(f"starting embedded servers (data in {data_dir})")
            servers.append(start_valkey(data_dir, host, redis_port))
            say(f"  ✓ valkey-server  redis://{host}:{redis_port}  (AOF on)")
            servers.append(start_nats(data_dir, host, nats_port))
            say(f"  ✓ nats-server    nats://{host}:{nats_port}  (JetStream, file storage)")
            env["NATS_URL"] = f"nats://{host}:{nats_port}"
            env["REDIS_URL"] = f"redis://{host}:{redis_port}/0"
        key = env.setdefault("SWITCHBOARD_BOOTSTRAP_API_KEY", "sk_dev_" + secrets.token_urlsafe(18))
        specs = list(SERVICES)
        if "SWITCHBOARD_TWILIO_AUTH_TOKEN" not in env:
            # No Twilio account: replies go to a local fake so an SMS round trip still works.
            env["SWITCHBOARD_TWILIO_BASE_URL"] = f"http://{host}:{TWILIO_FAKE.port(env)}"
            specs.insert(0, TWILIO_FAKE)
        say("starting services")
        for spec in specs:
            child = ChildProcess(
                spec.name,
                [sys.executable, "-m", f"services.{spec.name}"],
                logs / f"{spec.name}.log",
                env=env,
            )
            children.append(child)
            try:
                probe = "healthz" if spec is TWILIO_FAKE else "readyz"
                wait_ready(f"http://{host}:{spec.port(env)}/{probe}", child, 30)
            except StartError:
                say(tail(child.log_path))
                raise
            say(f"  ✓ {spec.name:<11} http://{host}:{spec.port(env)}  {spec.what}")
        api = f"http://{host}:{SERVICES[2].port(env)}"
        sms = f"http://{host}:{SERVICES[3].port(env)}"
        say(f"""
Switchboard is up. Logs: {logs}
  API            {api}   (OpenAPI: {api}/schema)
  SMS webhooks   {sms}/twilio/sms   status: {sms}/twilio/sms/status
  Voice webhook  http://{host}:{env.get("SWITCHBOARD_VOICE_PORT", "8082")}/twilio/voice   status: …/twilio/voice/status
  SMTP           {host}:{env.get("SWITCHBOARD_SMTP_PORT", "2525")} for @{env.get("SWITCHBOARD_EMAIL_DOMAINS", "switchboard.localhost")}; replies relay via {env.get("SWITCHBOARD_SMTP_RELAY_HOST", "127.0.0.1")}:{env.get("SWITCHBOARD_SMTP_RELAY_PORT", "1025")}
  Twilio REST    {env.get("SWITCHBOARD_TWILIO_BASE_URL", "https://api.twilio.com")}
  bootstrap key  {key}

Try it:
  curl -s -X POST {api}/v1/conversations -H 'x-api-key: {key}' -H 'content-type: application/json' -d '{{}}'
  curl -s -X POST {api}/v1/conversations/<id>/turns -H 'x-api-key: {key}' \\
       -H 'content-type: application/json' -d '{{"user_message": "how long do refunds take?"}}'

Press Ctrl-C to stop.""")
        while not stopping:
            for child in children + servers:
                if child.proc.poll() is not None:
                    say(
                        f"{child.name} exited unexpectedly ({child.proc.returncode}); stopping\n"
                        f"{tail(child.log_path)}"
                    )
                    stopping = True
                    break
            time.sleep(0.2)
        return_code = 0
    except StartError as exc:
        say(f"error: {exc}")
        return_code = 1
    finally:
        say("stopping…")
        for child in reversed(children):
            child.stop()
            say(f"  stopped {child.name}")
        for server in reversed(servers):
            server.stop()
            say(f"  stopped {server.name}")
    return return_code


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
    commands.add_parser("streams", help="print the JetStream stream names and subjects")
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
        from shared.bus import stream_configs
        from shared.subjects import Subjects

        configs = stream_configs(Subjects(os.environ.get("SWITCHBOARD_NAMESPACE", "")), 1)
        say(json.dumps({c.name: c.subjects for c in configs}, indent=2))
        return 0
    runpy.run_module(f"services.{args.command}", run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
