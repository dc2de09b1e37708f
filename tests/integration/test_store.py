"""The store against a real valkey-server."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import pytest
import redis.asyncio as redis

from services.core.lifecycle import ACCEPTS_USER_TURNS, transition
from shared.envelopes import Event, turn_created_event
from shared.errors import ConversationClosed, IllegalTransition, NotFound
from shared.models import Author, Conversation, Evidence, ToolCall, Turn, utcnow
from shared.store import Store
from tests.conftest import Servers


async def new_conversation(store: Store, cid: str = "conv_1", **fields: Any) -> Conversation:
    """An active API conversation, stored; `fields` replace or add to the defaults."""
    now = utcnow()
    defaults: dict[str, Any] = {
        "id": cid,
        "end_user_id": "usr_1",
        "channel": "api",
        "status": "active",
        "session_type": "live",
        "assigned_agent_id": "a",
        "pinned_revision_id": "r",
        "created_at": now,
        "updated_at": now,
        "context_variables": {"plan": "gold"},
    }
    conv = Conversation(**(defaults | fields))
    await store.create_conversation(conv)
    return conv


def turn(cid: str, text: str, tid: str = "t") -> Turn:
    return Turn(
        id=tid,
        conversation_id=cid,
        seq=0,
        role="user",
        content=text,
        author=Author(kind="end_user"),
        created_at=utcnow(),
    )


async def test_conversation_round_trips(store: Store) -> None:
    conv = await new_conversation(store)
    loaded = await store.get_conversation(conv.id)
    assert loaded.context_variables == {"plan": "gold"}
    assert loaded.status == "active"
    assert loaded.created_at == conv.created_at


async def test_turns_get_consecutive_seqs_even_when_appended_concurrently(store: Store) -> None:
    conv = await new_conversation(store)
    results = await asyncio.gather(
        *[
            store.append_turn(turn(conv.id, f"m{i}", f"t{i}"), allowed=ACCEPTS_USER_TURNS)
            for i in range(50)
        ]
    )
    assert sorted(r.seq for r in results) == list(range(1, 51))
    turns = await store.turns_after(conv.id, 0, 100)
    assert [t.seq for t in turns] == list(range(1, 51))
    assert {t.content for t in turns} == {f"m{i}" for i in range(50)}


async def test_an_append_can_return_the_conversation_as_it_left_it(store: Store) -> None:
    conv = await new_conversation(store)
    appended = await store.append_turn(
        turn(conv.id, "hi", "t1"), allowed=ACCEPTS_USER_TURNS, dedupe_key="env_1", current=True
    )
    assert appended.conversation == await store.get_conversation(conv.id)
    assert appended.conversation is not None
    assert appended.conversation.last_seq == 1
    again = await store.append_turn(
        turn(conv.id, "hi", "t1"), allowed=ACCEPTS_USER_TURNS, dedupe_key="env_1", current=True
    )
    assert (again.duplicate, again.conversation) == (True, appended.conversation)
    plain = await store.append_turn(turn(conv.id, "more", "t2"), allowed=ACCEPTS_USER_TURNS)
    assert plain.conversation is None


async def test_user_content_that_looks_like_a_seq_field_is_kept_verbatim(store: Store) -> None:
    conv = await new_conversation(store)
    text = 'evil "seq":-1, text'
    appended = await store.append_turn(turn(conv.id, text), allowed=ACCEPTS_USER_TURNS)
    stored = await store.get_turn(conv.id, appended.seq)
    assert stored is not None
    assert stored.content == text
    assert stored.seq == 1


async def test_a_turn_with_every_field_set_round_trips(store: Store) -> None:
    conv = await new_conversation(store)
    full = Turn(
        id="turn_full",
        conversation_id=conv.id,
        seq=0,
        role="assistant",
        content="Refund of $12.50 requested.",
        author=Author(kind="agent", id="agent_acme_support"),
        created_at=utcnow(),
        tool_calls=(
            ToolCall(name="issue_refund", arguments={"order_id": "12345"}, decision="allow"),
        ),
        evidence=(Evidence(chunk_id="kb#1", kb_id="kb", score=1.5, text="14 days"),),
        envelope_id="env_1",
        channel="sms",
        answered=False,
    )
    appended = await store.append_turn(full, allowed=ACCEPTS_USER_TURNS)
    assert await store.get_turn(conv.id, appended.seq) == msgspec.structs.replace(full, seq=1)
    assert await store.get_turn(conv.id, 2) is None


async def test_history_pages_by_seq(store: Store) -> None:
    conv = await new_conversation(store)
    for i in range(6):
        await store.append_turn(turn(conv.id, f"m{i}", f"t{i}"), allowed=ACCEPTS_USER_TURNS)
    assert [t.seq for t in await store.turns_after(conv.id, 3, 2)] == [4, 5]
    assert [t.content for t in await store.turns_after(conv.id, 4, 100)] == ["m4", "m5"]
    assert await store.turns_after(conv.id, 6, 10) == []


async def test_the_event_log_shows_each_turn_once_in_order_with_other_events(store: Store) -> None:
    conv = await new_conversation(store)
    first = await store.append_turn(turn(conv.id, "hi", "t1"), allowed=ACCEPTS_USER_TURNS)
    handoff = Event(
        id="evt_x", type="handoff.started", occurred_at=utcnow(), conversation_id=conv.id
    )
    assert await store.record_event(conv.id, handoff)
    assert not await store.record_event(conv.id, handoff)  # re-emitted: kept once
    await store.append_turn(turn(conv.id, "again", "t2"), allowed=ACCEPTS_USER_TURNS)
    events = await store.list_events(conv.id, 0, 10)
    assert [e.type for e in events] == ["turn.created", "handoff.started", "turn.created"]
    stored = await store.get_turn(conv.id, first.seq)
    assert stored is not None
    assert events[0] == turn_created_event(stored, "live", conv.channel)
    assert events[1] == handoff
    assert [e.id for e in await store.list_events(conv.id, 2, 10)] == ["evt_turn.created_t2"]


async def test_the_same_dedupe_key_appends_once(store: Store) -> None:
    conv = await new_conversation(store)
    first = await store.append_turn(
        turn(conv.id, "x"), allowed=ACCEPTS_USER_TURNS, dedupe_key="env_1", dedupe_ttl=60
    )
    second = await store.append_turn(
        turn(conv.id, "x"), allowed=ACCEPTS_USER_TURNS, dedupe_key="env_1", dedupe_ttl=60
    )
    assert (first.seq, first.duplicate) == (1, False)
    assert (second.seq, second.duplicate) == (1, True)
    assert len(await store.turns_after(conv.id, 0, 10)) == 1


async def test_closed_conversations_refuse_turns(store: Store) -> None:
    conv = await new_conversation(store)
    await transition(store, conv.id, "closed", "done")
    with pytest.raises(ConversationClosed):
        await store.append_turn(turn(conv.id, "x"), allowed=ACCEPTS_USER_TURNS)
    assert await store.turns_after(conv.id, 0, 10) == []


async def test_messages_for_an_inactive_conversation_are_queued(store: Store) -> None:
    conv = await new_conversation(store)
    await transition(store, conv.id, "waiting_for_human")
    appended = await store.append_turn(
        turn(conv.id, "x"), allowed=ACCEPTS_USER_TURNS, queue_if_inactive=True
    )
    assert appended.status == "waiting_for_human"
    assert await store.pending_seqs(conv.id) == [appended.seq]


async def test_illegal_transitions_report_the_current_status(store: Store) -> None:
    conv = await new_conversation(store)
    with pytest.raises(IllegalTransition) as caught:
        await transition(store, conv.id, "active")
    assert caught.value.details["status"] == "active"
    await transition(store, conv.id, "closed", "bye")
    with pytest.raises(ConversationClosed):
        await transition(store, conv.id, "waiting_for_human")
    assert (await store.get_conversation(conv.id)).closed_reason == "bye"


async def test_unknown_conversations_are_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.get_conversation("conv_missing")
    with pytest.raises(NotFound):
        await store.append_turn(turn("conv_missing", "x"), allowed=ACCEPTS_USER_TURNS)
    with pytest.raises(NotFound):
        await transition(store, "conv_missing", "closed")


async def test_concurrent_identity_resolution_creates_one_end_user(store: Store) -> None:
    results = await asyncio.gather(
        *[store.resolve_identity("phone", "+14155550109") for _ in range(20)]
    )
    assert len({uid for uid, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    user = await store.get_end_user(results[0][0])
    assert user.identities[0].value == "+14155550109"


async def test_keys_are_hash_tagged_by_conversation(
    store: Store, valkey: redis.Redis, namespace: str
) -> None:
    conv = await new_conversation(store, "conv_tagged")
    await store.append_turn(
        turn(conv.id, "x"), allowed=ACCEPTS_USER_TURNS, dedupe_key="e", dedupe_ttl=60
    )
    keys = [k.decode() for k in await valkey.keys(f"{namespace}:*{{conv_tagged}}*")]
    assert len(keys) == 4  # conversation, turn log, dedupe hash, event log: one cluster slot


async def test_conversation_list_pages_newest_first_with_filters(store: Store) -> None:
    for i in range(7):
        await new_conversation(store, f"conv_{i:02d}")
    await transition(store, "conv_03", "closed")
    first = await store.list_conversations(cursor=None, limit=3, filters={})
    assert [c.id for c in first.items] == ["conv_06", "conv_05", "conv_04"]
    second = await store.list_conversations(cursor=first.next_cursor, limit=3, filters={})
    assert [c.id for c in second.items] == ["conv_03", "conv_02", "conv_01"]
    closed = await store.list_conversations(cursor=None, limit=10, filters={"status": "closed"})
    assert [c.id for c in closed.items] == ["conv_03"]
    assert closed.next_cursor is None


async def test_the_store_does_not_keep_a_connection_valkey_closed(
    store: Store, servers: Servers
) -> None:
    conv = await new_conversation(store)
    await store.append_turn(turn(conv.id, "one", "t1"), allowed=ACCEPTS_USER_TURNS)
    used = await store.connection.redis.client_id()  # one pooled connection, reused in turn
    admin = redis.Redis.from_url(servers.redis_url)
    try:
        assert await admin.client_kill_filter(_id=used) == 1
    finally:
        await admin.aclose()
    # The command that finds the socket closed may fail (as with redis-py's own pool: the
    # caller retries); the connection is dropped, and the next command gets a new one.
    with contextlib.suppress(redis.ConnectionError):
        await store.append_turn(turn(conv.id, "two", "t2"), allowed=ACCEPTS_USER_TURNS)
    assert await store.connection.redis.client_id() != used
    appended = await store.append_turn(
        turn(conv.id, "two", "t2"), allowed=ACCEPTS_USER_TURNS, dedupe_key="t2"
    )
    assert appended.seq in (2, 3)


async def test_an_append_runs_after_valkey_forgot_the_scripts(
    store: Store, servers: Servers
) -> None:
    conv = await new_conversation(store)
    admin = redis.Redis.from_url(servers.redis_url)
    try:
        await admin.script_flush()  # as after a restart: EVALSHA answers NOSCRIPT once
    finally:
        await admin.aclose()
    appended = await store.append_turn(turn(conv.id, "one", "t1"), allowed=ACCEPTS_USER_TURNS)
    assert appended.seq == 1
