"""Fixtures shared by the integration modules (the stack itself is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from services.api.app import create_app
from shared.http import HttpServer
from shared.settings import ApiSettings
from shared.store import Store
from tests.agent_fakes import FakeServers
from tests.conftest import ADMIN_KEY, EMAIL_DOMAINS, Servers, Stack, settings_env


@pytest.fixture
async def store(servers: Servers, namespace: str) -> AsyncIterator[Store]:
    """A store in the test's namespace, for tests of the store itself (no services running)."""
    opened = Store(servers.redis_url, namespace)
    yield opened
    await opened.close()


@pytest.fixture
async def fakes() -> AsyncIterator[FakeServers]:
    servers = FakeServers()
    await servers.start()
    yield servers
    await servers.stop()


@pytest.fixture
async def api_replica(stack: Stack) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start another API replica on the stack's servers (its own key cache), with the settings a
    test chooses (`bootstrap_api_key`, limits, ...); returns its base URL."""
    servers: list[HttpServer] = []

    async def start(**settings: Any) -> str:
        env = {**settings_env(stack.servers, stack.namespace), "email_domains": EMAIL_DOMAINS}
        chosen = ApiSettings(**{**env, "api_port": 0, "bootstrap_api_key": ADMIN_KEY, **settings})
        server = HttpServer(create_app(chosen), "127.0.0.1", 0)
        await server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.stop()
