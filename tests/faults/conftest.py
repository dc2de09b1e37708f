"""The fleet: every service as a real process against real servers, with the Twilio fake and an
SMTP relay sink in the test, so a fault test can signal, kill and restart any of them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.supervisor.embedded import free_port
from shared.store import Store
from tests.conftest import (
    ADMIN_KEY,
    TWILIO_SID,
    TWILIO_TOKEN,
    Servers,
    SmtpSink,
    eventually,
)

SERVICES = ("core", "egress", "api", "sms", "email", "voice")
PORT_VARIABLE = {
    "core": "CORE_HEALTH",
    "egress": "EGRESS_HEALTH",
    "api": "API",
    "sms": "SMS",
    "email": "EMAIL_HEALTH",
    "voice": "VOICE",
}
OUR_NUMBER = "+15550001111"


@dataclass
class Fleet:
    env: dict[str, str]
    ports: dict[str, int]
    logs: Path
    fake: Any = None  # the FakeTwilio: every REST request egress made
    relay: Any = None  # the SmtpSink: every mail egress relayed
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    replicas: dict[str, str] = field(default_factory=dict)  # extra process name -> its service

    def add_replica(self, name: str, service: str) -> None:
        """Another process of `service`, known as `name`, with its own probes port."""
        self.replicas[name] = service
        self.ports[name] = free_port()

    def start(self, name: str) -> None:
        service = self.replicas.get(name, name)
        env = self.env
        if name in self.replicas:
            env = {**env, f"SWITCHBOARD_{PORT_VARIABLE[service]}_PORT": str(self.ports[name])}
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"], env=env, stdout=log, stderr=log
        )

    def port(self, name: str) -> int:
        return self.ports[name] if name in self.replicas else self.ports[PORT_VARIABLE[name]]

    async def ready(self, name: str, timeout: float = 30) -> None:
        url = f"http://127.0.0.1:{self.port(name)}/readyz"

        async def check() -> bool:
            assert self.procs[name].poll() is None, self.log_tail(name)
            return await self.probe(name) == 200

        await eventually(check, timeout=timeout, what=f"{name} ready at {url}")

    async def probe(self, name: str) -> int | None:
        """The status of the service's /readyz, or None when it does not answer."""
        url = f"http://127.0.0.1:{self.port(name)}/readyz"
        try:
            async with httpx.AsyncClient(timeout=1) as client:
                return (await client.get(url)).status_code
        except httpx.HTTPError:
            return None

    async def kill(self, name: str) -> None:
        """kill -9: no shutdown code runs, whatever was in flight is abandoned."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)

    def log_tail(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port(name)}"

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@contextlib.asynccontextmanager
async def launch_fleet(
    nats_url: str,
    redis_url: str,
    namespace: str,
    logs: Path,
    *,
    only: tuple[str, ...] = SERVICES,
    extra_env: Mapping[str, str] | None = None,
    **settings: str,
) -> AsyncIterator[Fleet]:
    """Start every service, or `only` those (core first: it creates the streams and seeds the
    demo agent); `extra_env` adds variables as they are, `settings` as SWITCHBOARD_ ones."""
    from services.twilio_fake.app import build, serve

    fake = build({TWILIO_SID: TWILIO_TOKEN})
    fake_server = await serve(fake, "127.0.0.1", 0)
    relay = SmtpSink()
    await relay.start()
    ports = {name: free_port() for name in (*PORT_VARIABLE.values(), "SMTP")}
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "REDIS_URL": redis_url,
        "SWITCHBOARD_NAMESPACE": namespace,
        "SWITCHBOARD_PARTITIONS": "4",
        "SWITCHBOARD_BOOTSTRAP_API_KEY": ADMIN_KEY,
        "SWITCHBOARD_EMAIL_DOMAINS": "acme.test",
        "SWITCHBOARD_TWILIO_ACCOUNT_SID": TWILIO_SID,
        "SWITCHBOARD_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "SWITCHBOARD_TWILIO_BASE_URL": f"http://127.0.0.1:{fake_server.port}",
        "SWITCHBOARD_SMTP_RELAY_PORT": str(relay.port),
        "SWITCHBOARD_LOG_FORMAT": "text",
        **{f"SWITCHBOARD_{name}_PORT": str(port) for name, port in ports.items()},
        **{f"SWITCHBOARD_{k.upper()}": v for k, v in settings.items()},
        **(extra_env or {}),
    }
    fleet = Fleet(env, ports, logs, fake=fake, relay=relay)
    try:
        fleet.start("core")
        await fleet.ready("core")
        others = [name for name in only if name != "core"]
        for name in others:
            fleet.start(name)
        await asyncio.gather(*(fleet.ready(name) for name in others))
        yield fleet
    finally:
        fleet.stop_all()
        await fake_server.stop()
        await relay.stop()


@pytest.fixture
async def fleet(servers: Servers, namespace: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with launch_fleet(servers.nats_url, servers.redis_url, namespace, tmp_path) as fleet:
        yield fleet


@pytest.fixture
async def store(servers: Servers, namespace: str) -> AsyncIterator[Store]:
    """The store the fleet writes, read directly to check what happened."""
    store = Store(servers.redis_url, namespace)
    yield store
    await store.close()
