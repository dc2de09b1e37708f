"""Core applies an API turn to a conversation it has seen without reading the conversation first:
the append returns it (`Known`, services/core/conversations.py). Core runs in this process here, on
the real NATS and Valkey, so every read it makes can be counted."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as redis

from services.core import turns
from services.core.agent.demo import seed_demo_agent
from services.core.conversations import Conversations
from shared.bus import Bus
from shared.envelopes import InboundMessage, TurnReply
from shared.models import Conversation, utcnow
from shared.settings import CoreSettings, load_settings
from shared.store import Store
from shared.telemetry import Metrics
from tests.conftest import Servers, eventually


@pytest.fixture
async def core(servers: Servers, namespace: str, bus: Bus) -> AsyncIterator[Conversations]:
    settings = load_settings(
        CoreSettings,
        {},
        nats_url=servers.nats_url,
        redis_url=servers.redis_url,
        namespace=namespace,
    )
    store = Store(servers.redis_url, namespace)
    await seed_demo_agent(store, settings.default_agent)
    yield Conversations(settings, store, bus, Metrics("core"))
    await store.close()


class Reads:
    """Every conversation core reads, in order (a wrapper around the real store's read)."""

    def __init__(self, store: Store) -> None:
        self.ids: list[str] = []
        real = store.get_conversation

        async def counted(cid: str) -> Conversation:
            self.ids.append(cid)
            return await real(cid)

        store.get_conversation = counted  # type: ignore[method-assign]


def message(conv: Conversation, n: int, text: str = "how long do refunds take?") -> InboundMessage:
    return InboundMessage(
        id=f"env_{conv.id}_{n}",
        channel="api",
        received_at=utcnow(),
        session_type="live",
        conversation_id=conv.id,
        text=text,
    )


async def test_a_turn_to_a_conversation_core_has_seen_reads_no_conversation_first(
    core: Conversations,
) -> None:
    conv = await core.open(channel="api", end_user_id="usr_known", agent_id=None)
    reads = Reads(core.store)
    await turns.apply_message(core, message(conv, 1))
    assert reads.ids == [conv.id]  # the first turn: core had not seen it
    await turns.apply_message(core, message(conv, 2))
    assert reads.ids == [conv.id]
    await turns.apply_message(core, message(conv, 2))  # a redelivery: deduplicated, answered once
    transcript = await core.store.turns_after(conv.id, 0, 10)
    assert [(t.seq, t.role) for t in transcript] == [
        (1, "user"),
        (2, "assistant"),
        (3, "user"),
        (4, "assistant"),
    ]
    assert transcript[2].author.id == "usr_known"
    assert (await core.store.usage())["turns:api"] == 4


async def test_a_turn_to_a_known_conversation_that_was_erased_is_rejected_as_not_found(
    core: Conversations, bus: Bus, valkey: redis.Redis, namespace: str
) -> None:
    conv = await core.open(channel="api", end_user_id="usr_gone", agent_id=None)
    await turns.apply_message(core, message(conv, 1))
    assert core.known(conv.id) is not None
    await valkey.delete(core.store.connection.keys.conversation(conv.id))
    replies: list[TurnReply] = []

    async def on_reply(msg: object) -> None:
        replies.append(msgspec.json.decode(msg.data, type=TurnReply))  # type: ignore[attr-defined]

    await bus.nc.subscribe(bus.subjects.reply(conv.id), cb=on_reply)
    await bus.nc.flush()
    await turns.apply_message(core, message(conv, 2))
    reply = await eventually(lambda: replies[0] if replies else None, what="the reply")
    assert (reply.outcome, reply.error_code) == ("rejected", "not_found")
    assert core.known(conv.id) is None
    assert len(await core.store.turns_after(conv.id, 0, 10)) == 2  # nothing appended after
