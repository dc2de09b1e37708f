"""Fixtures: real nats-server and valkey-server, started once per test session.

Each test gets its own namespace (subjects, streams and keys), never its own server.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis.asyncio as redis

from services.supervisor.embedded import ChildProcess, free_port, start_nats, start_valkey
from shared.bus import Bus
from shared.subjects import Subjects

T = TypeVar("T")
ADMIN_KEY = "sk_test_admin"


@dataclass(frozen=True)
class Servers:
    nats_url: str
    redis_url: str
    data_dir: Path


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    data_dir = tmp_path_factory.mktemp("servers")
    nats_port, redis_port = free_port(), free_port()
    valkey: ChildProcess = start_valkey(data_dir, "127.0.0.1", redis_port)
    nats: ChildProcess = start_nats(data_dir, "127.0.0.1", nats_port)
    try:
        yield Servers(
            f"nats://127.0.0.1:{nats_port}", f"redis://127.0.0.1:{redis_port}/0", data_dir
        )
    finally:
        nats.stop()
        valkey.stop()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def partitions() -> int:
    """How many partitions the test's `bus` has (a test module may override this fixture)."""
    return 2


@pytest.fixture
async def bus(servers: Servers, namespace: str, partitions: int) -> AsyncIterator[Bus]:
    """A connected bus with its streams, in the test's namespace."""
    bus = Bus(servers.nats_url, Subjects(namespace, partitions=partitions), name="test")
    await bus.connect()
    await bus.ensure_streams()
    yield bus
    await bus.close()


@pytest.fixture
async def valkey(servers: Servers) -> AsyncIterator[redis.Redis]:
    """A raw client, for tests that inspect what the store wrote (services never get one)."""
    client = redis.Redis.from_url(servers.redis_url)
    yield client
    await client.aclose()


async def eventually(
    check: Callable[[], Awaitable[T | None] | T | None],
    timeout: float = 10.0,
    what: str = "condition",
) -> T:
    """Poll `check` (a plain condition or a coroutine function) until it returns something truthy;
    fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        result = await outcome if inspect.isawaitable(outcome) else outcome
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


TWILIO_SID = "AC" + "1" * 32
TWILIO_TOKEN = "test-auth-token"
SMS_PUBLIC_URL = "https://sms.example.test"
EMAIL_DOMAINS = "acme.test,support.acme.test"
VOICE_PUBLIC_URL = "https://voice.example.test"
HUMAN_QUEUE = "+15550009999"
EMAIL_MAX_BYTES = 256 * 1024  # what Twilio signs: not the address we listen on


def twilio_env(fake_url: str) -> dict[str, Any]:
    return {
        "twilio_account_sid": TWILIO_SID,
        "twilio_auth_token": TWILIO_TOKEN,
        "twilio_base_url": fake_url,
        "sms_public_url": SMS_PUBLIC_URL,
        "voice_public_url": VOICE_PUBLIC_URL,
        "voice_reply_budget_seconds": 1.0,
    }


def settings_env(servers: Servers, namespace: str) -> dict[str, Any]:
    return {
        "nats_url": servers.nats_url,
        "redis_url": servers.redis_url,
        "namespace": namespace,
        "partitions": 4,
        "log_format": "text",
        # JetStream reserves each stream's byte limit on the server when the stream is created,
        # and every test's namespace has its own streams: keep the reservations small.
        "inbound_max_bytes": 16 * 1024 * 1024,
        "outbound_max_bytes": 16 * 1024 * 1024,
        "events_max_bytes": 16 * 1024 * 1024,
        "dead_max_bytes": 4 * 1024 * 1024,
    }


class SmtpSink:
    """A real SMTP server standing in for the outbound relay: keeps every message it gets."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._sessions: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import email
        import email.policy

        self.messages.append(
            email.message_from_bytes(envelope.content, policy=email.policy.default)
        )
        return "250 OK"

    async def start(self) -> None:
        """Listen on a free port, or again on the same one after `stop` (an outage ending)."""
        from aiosmtpd.smtp import SMTP

        loop = asyncio.get_running_loop()

        def session() -> Any:
            smtp = SMTP(self, loop=loop)
            self._sessions.append(smtp)
            return smtp

        self._server = await loop.create_server(session, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and hang up on every client (a relay going away)."""
        if self._server is not None:
            self._server.close()
            for smtp in self._sessions:
                if smtp.transport is not None:
                    smtp.transport.close()
            self._sessions.clear()
            await self._server.wait_closed()
            self._server = None


ALL_SERVICES = frozenset({"api", "sms", "voice", "email", "egress"})


@dataclass
class Stack:
    api: httpx.AsyncClient
    namespace: str
    core: Any
    base_url: str
    servers: Servers
    started: frozenset[str]  # which of ALL_SERVICES run beside core (`@pytest.mark.services`)
    _sms_url: str | None = None
    _twilio: Any = None  # the FakeTwilio: what was sent, and faults to inject
    _smtp_port: int | None = None  # our inbound SMTP server
    _relay: Any = None  # the SMTP sink egress relays through: `relay.messages`
    _voice_url: str | None = None
    api_app: Any = None  # the API's Litestar app, for tests that speak ASGI to it directly

    def _needs(self, service: str, value: Any) -> Any:
        if value is None:
            raise AssertionError(
                f"this test's stack has no {service}: started {sorted(self.started)};"
                f" name it in @pytest.mark.services(...)"
            )
        return value

    @property
    def sms_url(self) -> str:
        return str(self._needs("sms", self._sms_url))

    @property
    def voice_url(self) -> str:
        return str(self._needs("voice", self._voice_url))

    @property
    def smtp_port(self) -> int:
        return int(self._needs("email", self._smtp_port))

    @property
    def twilio(self) -> Any:
        return self._needs("sms, voice or egress (the Twilio fake)", self._twilio)

    @property
    def relay(self) -> Any:
        return self._needs("egress (the SMTP relay sink)", self._relay)

    def client(self, key: str | None) -> httpx.AsyncClient:
        headers = {"x-api-key": key} if key else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=20)

    async def restart_core(self, **overrides: Any) -> None:
        """Stop core and start a fresh process-equivalent: nothing survives but NATS and Valkey."""
        from services.core.app import Core

        await self.core.stop()
        self.core = Core(core_settings(self.servers, self.namespace, **overrides))
        await self.core.start()


async def make_key(stack: Stack, scope: str) -> str:
    """A new API key with one scope; returns its secret (shown only in this answer)."""
    response = await stack.api.post("/v1/api-keys", json={"name": scope, "scopes": [scope]})
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def core_settings(servers: Servers, namespace: str, **overrides: Any) -> Any:
    from shared.settings import CoreSettings

    return CoreSettings(
        **{
            **settings_env(servers, namespace),
            "email_domains": EMAIL_DOMAINS,
            "core_health_port": 0,
            "approval_sweep_seconds": 0.1,
            "human_queue_number": HUMAN_QUEUE,
            **overrides,
        }
    )


@pytest.fixture
async def stack(
    servers: Servers, namespace: str, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    """Core and the services the test names, running in this process against the real servers,
    on real sockets, with the Twilio fake standing in for Twilio's cloud and an SMTP sink for the
    relay (started only when sms, voice or egress is).

    `@pytest.mark.services("api", ...)` names the services beside core (default: all of
    ALL_SERVICES); `@pytest.mark.core_settings(**overrides)` starts core with those settings
    (no restart)."""
    from services.api.app import create_app
    from services.core.app import Core
    from services.egress.app import Egress
    from services.email.app import EmailService
    from services.sms.app import create_app as create_sms_app
    from services.twilio_fake.app import build, serve
    from services.voice.app import create_app as create_voice_app
    from shared.http import HttpServer
    from shared.settings import (
        ApiSettings,
        EgressSettings,
        EmailSettings,
        SmsSettings,
        VoiceSettings,
    )

    named = request.node.get_closest_marker("services")
    wanted = frozenset(named.args) if named else ALL_SERVICES
    assert wanted <= ALL_SERVICES, f"unknown services: {sorted(wanted - ALL_SERVICES)}"
    assert "api" in wanted, "every stack test talks to the API"
    env = {**settings_env(servers, namespace), "email_domains": EMAIL_DOMAINS}
    starts: list[Awaitable[None]] = []
    stops: dict[str, Callable[[], Awaitable[None]]] = {}
    fake = fake_server = relay = twilio = None
    if wanted & {"sms", "voice", "egress"}:
        fake = build({TWILIO_SID: TWILIO_TOKEN})
        fake_server = await serve(fake, "127.0.0.1", 0)
        twilio = twilio_env(f"http://127.0.0.1:{fake_server.port}")
    marker = request.node.get_closest_marker("core_settings")
    core = Core(core_settings(servers, namespace, **(marker.kwargs if marker else {})))
    await core.start()  # first: it seeds the demo agent the others expect
    if "egress" in wanted:
        relay = SmtpSink()
        await relay.start()
        egress = Egress(
            EgressSettings(
                **env,
                **twilio,
                egress_health_port=0,
                webhook_backoff_seconds=0.05,
                webhook_max_attempts=4,
                egress_retry_base_seconds=0.1,  # held replies (provider refusals) retry quickly
                smtp_relay_port=relay.port,
            )
        )
        starts.append(egress.start())
        stops["egress"] = egress.stop
    sms = voice = mail = None
    if "sms" in wanted:
        sms = HttpServer(create_sms_app(SmsSettings(**env, **twilio)), "127.0.0.1", 0)
        starts.append(sms.start())
        stops["sms"] = sms.stop
    if "voice" in wanted:
        voice = HttpServer(
            create_voice_app(VoiceSettings(**env, **twilio, human_queue_number=HUMAN_QUEUE)),
            "127.0.0.1",
            0,
        )
        starts.append(voice.start())
        stops["voice"] = voice.stop
    api_app = create_app(ApiSettings(**env, api_port=0, bootstrap_api_key=ADMIN_KEY))
    api = HttpServer(api_app, "127.0.0.1", 0)
    starts.append(api.start())
    stops["api"] = api.stop
    if "email" in wanted:
        mail = EmailService(
            EmailSettings(**env, smtp_port=0, email_health_port=0, email_max_bytes=EMAIL_MAX_BYTES)
        )
        starts.append(mail.start())
        stops["email"] = mail.stop
    await asyncio.gather(*starts)
    base_url = f"http://127.0.0.1:{api.port}"
    async with httpx.AsyncClient(
        base_url=base_url, headers={"x-api-key": ADMIN_KEY}, timeout=20
    ) as client:
        stack = Stack(
            api=client,
            namespace=namespace,
            core=core,
            base_url=base_url,
            servers=servers,
            started=wanted,
            _sms_url=f"http://127.0.0.1:{sms.port}" if sms else None,
            _twilio=fake,
            _smtp_port=mail.port if mail else None,
            _relay=relay,
            _voice_url=f"http://127.0.0.1:{voice.port}" if voice else None,
            api_app=api_app,
        )
        yield stack
    await asyncio.gather(*(_stopped(name, stop()) for name, stop in stops.items()))
    last = [_stopped("core", stack.core.stop())]
    if fake_server is not None:
        last.append(_stopped("twilio-fake", fake_server.stop()))
    if relay is not None:
        last.append(_stopped("relay", relay.stop()))
    await asyncio.gather(*last)


async def _stopped(name: str, stopping: Awaitable[None], timeout: float = 20.0) -> None:
    """Stop a service; if it hangs, fail with every task's stack instead of hanging the suite."""
    try:
        await asyncio.wait_for(stopping, timeout)
    except TimeoutError:
        import io

        out = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(file=out)
        raise AssertionError(f"{name} did not stop within {timeout}s:\n{out.getvalue()}") from None
