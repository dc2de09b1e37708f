"""Fixtures: real nats-server and valkey-server, started once per test session.

Each test gets its own namespace (subjects, streams and keys), never its own server.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from services.supervisor.embedded import ChildProcess, free_port, start_nats, start_valkey

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


async def eventually(
    check: Callable[[], Awaitable[T | None]], timeout: float = 10.0, what: str = "condition"
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def settings_env(servers: Servers, namespace: str) -> dict[str, Any]:
    return {
        "nats_url": servers.nats_url,
        "redis_url": servers.redis_url,
        "namespace": namespace,
        "partitions": 4,
        "log_format": "text",
    }


@dataclass
class Stack:
    api: httpx.AsyncClient
    namespace: str
    core: Any
    base_url: str
    servers: Servers

    async def restart_core(self, **overrides: Any) -> None:
        """Stop core and start a fresh process-equivalent: nothing survives but NATS and Valkey."""
        from services.core.app import Core
        from shared.settings import CoreSettings

        await self.core.stop()
        env = settings_env(self.servers, self.namespace)
        self.core = Core(
            CoreSettings(
                **{**env, "core_health_port": 0, "approval_sweep_seconds": 0.1, **overrides}
            )
        )
        await self.core.start()

    def client(self, key: str | None) -> httpx.AsyncClient:
        headers = {"x-api-key": key} if key else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=20)


@pytest.fixture
async def stack(servers: Servers, namespace: str) -> AsyncIterator[Stack]:
    """Core and the API running in this process against the real servers, on real sockets."""
    from services.api.app import create_app
    from services.core.app import Core
    from services.egress.app import Egress
    from shared.http import HttpServer
    from shared.settings import ApiSettings, CoreSettings, EgressSettings

    env = settings_env(servers, namespace)
    core = Core(CoreSettings(**env, core_health_port=0, approval_sweep_seconds=0.1))
    await core.start()
    egress = Egress(
        EgressSettings(
            **env, egress_health_port=0, webhook_backoff_seconds=0.05, webhook_max_attempts=4
        )
    )
    await egress.start()
    api = HttpServer(
        create_app(ApiSettings(**env, api_port=0, bootstrap_api_key=ADMIN_KEY)), "127.0.0.1", 0
    )
    await api.start()
    base_url = f"http://127.0.0.1:{api.port}"
    async with httpx.AsyncClient(
        base_url=base_url, headers={"x-api-key": ADMIN_KEY}, timeout=20
    ) as client:
        stack = Stack(
            api=client, namespace=namespace, core=core, base_url=base_url, servers=servers
        )
        yield stack
    await api.stop()
    await egress.stop()
    await stack.core.stop()
