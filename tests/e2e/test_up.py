"""`switchboard up` as a user runs it: a subprocess, real ports, Ctrl-C at the end."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from twilio.request_validator import RequestValidator

from services.supervisor.embedded import free_port

pytestmark = pytest.mark.e2e


def read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float) -> str:
    """Collect stdout until `marker` appears; fail with everything printed so far."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    output = ""
    deadline = time.monotonic() + timeout
    while marker not in output:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            raise AssertionError(f"`switchboard up` never printed {marker!r}:\n{output}")
        if selector.select(remaining):
            output += os.read(fd, 65536).decode(errors="replace")
    return output


def test_up_runs_the_whole_gateway_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    names = (
        "API",
        "CORE_HEALTH",
        "EGRESS_HEALTH",
        "SMS",
        "TWILIO_FAKE",
        "SMTP",
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
        **{f"SWITCHBOARD_{name}_PORT": str(port) for name, port in ports.items()},
    }
    env.pop("NATS_URL", None)
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.supervisor", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        banner = read_until(proc, "Press Ctrl-C to stop.", timeout=90)
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

        with httpx.Client(base_url=api, headers={"x-api-key": "sk_e2e"}, timeout=20) as client:
            conv = client.post("/v1/conversations", json={})
            assert conv.status_code == 201, conv.text
            reply = client.post(
                f"/v1/conversations/{conv.json()['id']}/turns",
                json={"user_message": "how long does standard shipping take?"},
            )
            assert reply.status_code == 200, reply.text
            assert "3-5 business days" in reply.json()["text"]
            assert reply.json()["evidence"][0]["chunk_id"] == "shipping#0"
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
        signature = RequestValidator("dev-auth-token").compute_signature(sms_url, form)
        accepted = httpx.post(sms_url, data=form, headers={"X-Twilio-Signature": signature})
        assert accepted.status_code == 200, accepted.text
        fake = f"http://127.0.0.1:{ports['TWILIO_FAKE']}/_fake/requests"
        deadline = time.monotonic() + 20
        while not (sent := httpx.get(fake).json()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sent, "no SMS reached the Twilio fake"
        assert "Monday to Friday" in sent[0]["form"]["Body"], sent

        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        rest = out.decode(errors="replace")
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
