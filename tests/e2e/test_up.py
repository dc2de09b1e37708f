"""`switchboard up` as a user runs it: a subprocess, real ports, Ctrl-C at the end."""

from __future__ import annotations

import os
import selectors
import signal
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from aiosmtpd.controller import Controller

from services.supervisor.embedded import free_port
from tests.twilio_forms import post_twilio_sync

pytestmark = pytest.mark.e2e


class Console:
    """Everything `switchboard up` printed so far, read as it comes."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)
        self.output = ""

    def wait_for(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"`switchboard up` never printed {marker!r}:\n{self.output}")
            if self.selector.select(remaining):
                self.output += os.read(self.fd, 65536).decode(errors="replace")
        return self.output


UP = [sys.executable, "-m", "services.supervisor", "up"]


def up_refused(env: dict[str, str]) -> tuple[int, str]:
    """`switchboard up` where it is expected to exit on its own: its exit code and what it said."""
    done = subprocess.run(UP, env=env, capture_output=True, timeout=60)
    return done.returncode, done.stdout.decode(errors="replace")


def ask_about_shipping(api: str) -> dict[str, Any]:
    """A new conversation over the API, asked one question: the turn's body."""
    with httpx.Client(base_url=api, headers={"x-api-key": "sk_e2e"}, timeout=20) as client:
        conv = client.post("/v1/conversations", json={})
        assert conv.status_code == 201, conv.text
        reply = client.post(
            f"/v1/conversations/{conv.json()['id']}/turns",
            json={"user_message": "how long does standard shipping take?"},
        )
        assert reply.status_code == 200, reply.text
        return dict(reply.json())


def test_up_refuses_a_port_in_use_naming_it_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "SWITCHBOARD_DATA_DIR": str(tmp_path / "data"),
            "SWITCHBOARD_NATS_PORT": str(free_port()),
            "SWITCHBOARD_REDIS_PORT": str(free_port()),
            "SWITCHBOARD_API_PORT": str(port),
        }
        code, out = up_refused(env)
    assert code == 1, out
    assert f"port {port} on 127.0.0.1 (api: HTTP API) is already in use" in out
    assert "set SWITCHBOARD_API_PORT to a free port" in out
    assert "nothing was started" in out
    assert "✓" not in out
    assert "Switchboard is up" not in out
    assert not (tmp_path / "data" / "nats").exists()  # no server was started


def test_up_runs_the_whole_gateway_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    names = (
        "API",
        "CORE_HEALTH",
        "EGRESS_HEALTH",
        "SMS",
        "VOICE",
        "TWILIO_FAKE",
        "SMTP",
        "SMTP_RELAY",  # nothing listens there until the test starts a relay
        "EMAIL_HEALTH",
        "NATS",
        "REDIS",
    )
    ports = {name: free_port() for name in names}
    env = {
        **os.environ,
        "SWITCHBOARD_DATA_DIR": str(tmp_path / "data"),
        "SWITCHBOARD_BOOTSTRAP_API_KEY": "sk_e2e",
        "PYTHONUNBUFFERED": "1",
        "SWITCHBOARD_RESTART_BACKOFF_SECONDS": "0.5",
        "SWITCHBOARD_EGRESS_RETRY_MAX_DELAY_SECONDS": "1",
        **{f"SWITCHBOARD_{name}_PORT": str(port) for name, port in ports.items()},
    }
    env.pop("NATS_URL", None)
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        UP,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        console = Console(proc)
        banner = console.wait_for("Press Ctrl-C to stop.", timeout=90)
        api = f"http://127.0.0.1:{ports['API']}"
        assert api in banner
        assert "sk_e2e" in banner
        assert "curl" in banner
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "nats-server" in names
        assert "valkey-server" in names
        assert "services.core" in names
        assert "services.egress" in names
        assert "services.api" in names
        assert "services.email" in names
        assert "services.voice" in names

        reply = ask_about_shipping(api)
        assert "3-5 business days" in reply["text"]
        assert reply["evidence"][0]["chunk_id"] == "shipping#0"
        core_ready = httpx.get(f"http://127.0.0.1:{ports['CORE_HEALTH']}/readyz")
        assert core_ready.json()["ready"] is True

        # An SMS round trip with the dev credentials, answered into the local Twilio fake.
        sms_url = f"http://127.0.0.1:{ports['SMS']}/twilio/sms"
        form = {
            "MessageSid": "SM" + "e" * 32,
            "AccountSid": "AC" + "0" * 32,
            "From": "+14155550109",
            "To": "+15550001111",
            "Body": "what are your hours?",
        }
        accepted = post_twilio_sync(sms_url, form, token="dev-auth-token")
        assert accepted.status_code == 200, accepted.text
        fake = f"http://127.0.0.1:{ports['TWILIO_FAKE']}/_fake/requests"
        deadline = time.monotonic() + 20
        while not (sent := httpx.get(fake).json()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sent, "no SMS reached the Twilio fake"
        assert "Monday to Friday" in sent[0]["form"]["Body"], sent

        # A second `up` on the same ports fails, says which, and changes nothing.
        code, refused = up_refused(env)
        assert code == 1, refused
        assert f"port {ports['API']} on 127.0.0.1 (api: HTTP API) is already in use" in refused
        assert "SWITCHBOARD_NATS_PORT" in refused
        assert "Switchboard is up" not in refused

        # A reply that fails for good is one console line (the dead letter), not silence.
        magic = {**form, "MessageSid": "SM" + "d" * 32, "From": "+15005550001"}
        assert post_twilio_sync(sms_url, magic, token="dev-auth-token").is_success
        console.wait_for("twilio_error 21211", timeout=30)
        assert "dead letter dead_" in console.output

        # A service killed later is restarted, visibly, and the gateway keeps answering.
        core = next(c for c in children if "services.core" in " ".join(c.cmdline()))
        core.kill()
        console.wait_for("✓ core restarted", timeout=60)
        assert "! core exited unexpectedly (code -9); restarting in" in console.output
        assert "3-5 business days" in ask_about_shipping(api)["text"]  # the restarted core answers
        assert proc.poll() is None  # the rest of the stack never went down

        # An email reply while the relay is unreachable: one console line when the outage
        # begins, one when the relay is back, and the reply is delivered then.
        mail = EmailMessage()
        mail["From"], mail["To"] = "ann@example.com", "support@switchboard.localhost"
        mail["Subject"], mail["Message-ID"] = "Hours", "<e2e-outage@example.com>"
        mail.set_content("what are your hours?")
        with smtplib.SMTP("127.0.0.1", ports["SMTP"], timeout=20) as smtp:
            smtp.send_message(mail)
        console.wait_for("provider outage begins: SMTP relay", timeout=60)
        relayed: list[bytes] = []

        class Relay:
            async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
                relayed.append(envelope.content)
                return "250 OK"

        relay = Controller(Relay(), hostname="127.0.0.1", port=ports["SMTP_RELAY"])
        relay.start()
        try:
            console.wait_for("provider outage ends: SMTP relay", timeout=60)
            deadline = time.monotonic() + 20
            while not relayed and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(relayed) == 1
            assert b"In-Reply-To: <e2e-outage@example.com>" in relayed[0]
        finally:
            relay.stop()
        children = psutil.Process(proc.pid).children(recursive=True)

        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        rest = console.output + out.decode(errors="replace")
        assert proc.returncode == 0, rest
        assert "stopped nats-server" in rest
        assert "stopped valkey-server" in rest
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"left running: {alive}"
        assert (tmp_path / "data" / "valkey" / "appendonlydir").is_dir()
        assert (tmp_path / "data" / "nats" / "jetstream").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
