"""A customer's endpoint failing again and again is an outage of that endpoint: its events are
held past the attempt budget and delivered when it recovers, and the log says so twice (begins,
with the reason; ends), not once per attempt with a traceback."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from tests.conftest import Stack, eventually
from tests.integration.test_streaming_webhooks_sessions import Receiver


@pytest.fixture
async def flaky_receiver() -> AsyncIterator[Receiver]:
    # More failures than webhook_max_attempts (4) in the stack.
    async with Receiver(fail_first=7).serving() as rec:
        yield rec


async def test_a_failing_webhook_is_held_and_logged_once_not_per_attempt(
    stack: Stack, flaky_receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hook = await stack.api.post(
        "/v1/webhooks", json={"url": flaky_receiver.url, "events": ["conversation.created"]}
    )
    assert hook.status_code == 201, hook.text
    conv = await stack.api.post("/v1/conversations", json={})
    assert conv.status_code == 201
    await eventually(
        lambda: _first(flaky_receiver.accepted), timeout=30, what="the event after the outage"
    )
    assert len(flaky_receiver.received) == 8
    assert len(flaky_receiver.accepted) == 1

    async def outage_lines() -> list[str] | None:
        found = [r.getMessage() for r in caplog.records if r.name == "switchboard.egress.outages"]
        return found if any("ends" in line for line in found) else None

    lines = await eventually(outage_lines, what="the outage's end logged")
    webhook_id = hook.json()["id"]
    assert [line.split(";")[0] for line in lines if "begins" in line] == [
        f"provider outage begins: webhook {webhook_id} (HTTP 503)"
    ]
    assert len([line for line in lines if "ends" in line]) == 1
    assert "(7 attempts held)" in next(line for line in lines if "ends" in line)
    assert not [r for r in caplog.records if r.exc_info and "webhook" in str(r.__dict__)]
    letters = (await stack.api.get("/v1/dead-letters")).json()["items"]
    assert letters == []


async def _first(items: list[object]) -> object:
    return items[0] if items else None
