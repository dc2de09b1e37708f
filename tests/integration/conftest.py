"""Fixtures shared by the integration modules (the stack itself is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.agent_fakes import FakeServers


@pytest.fixture
async def fakes() -> AsyncIterator[FakeServers]:
    servers = FakeServers()
    await servers.start()
    yield servers
    await servers.stop()
