"""SMS threads: (channel, thread key) → conversation, one thread per phone number and our number,
and the threads an older version indexed by (end user, our number) carried over on their next text.

An "older version" here is its Valkey state, written directly: the conversation's own keys stay as
they are, its `thread` entry and pointer go, and the old index entry names it (the key as those
versions spelt it, not the current recipe).
"""

from __future__ import annotations

from typing import Any

import pytest

from shared.models import Conversation
from shared.store import Store
from tests.conftest import Stack, eventually, make_key
from tests.integration.test_email import user_texts
from tests.integration.test_sms import ALICE, OUR_NUMBER, post_signed, sent_messages, sms_form
from tests.integration.test_store import new_conversation

pytestmark = pytest.mark.services("api", "sms", "egress")

ALICE_WORK = "+14155550188"  # a second phone of Alice's, linked to her end user


def thread_entry(stack: Stack, sender: str) -> str:
    return f"{stack.namespace}:thread:sms:{sender}|{OUR_NUMBER}"


def old_entry(stack: Stack, end_user_id: str) -> str:
    """The (end user, channel, our address) index of versions before thread keys."""
    return f"{stack.namespace}:open:{{{end_user_id}}}:sms:{OUR_NUMBER}"


async def text(stack: Stack, body: str, sender: str = ALICE) -> None:
    response = await post_signed(stack, "/twilio/sms", sms_form(body, sender=sender))
    assert response.status_code == 200, response.text


async def sms_conversations(stack: Stack) -> list[Any]:
    page = await stack.core.store.list_conversations(
        cursor=None, limit=100, filters={"channel": "sms"}
    )
    return page.items  # type: ignore[no-any-return]


async def replies_to(stack: Stack, number: str, n: int) -> list[dict[str, str]] | None:
    sent = sent_messages(stack, number)
    return sent if len(sent) >= n else None


def raw(stack: Stack) -> Any:
    """The store's own client (one server or a cluster), to write and read keys as they are."""
    return stack.core.store.connection.redis


async def as_an_older_version_left_it(stack: Stack, valkey: Any, cid: str) -> str:
    """Index Alice's conversation as versions before thread keys did; returns her end user id."""
    conv = await stack.core.store.get_conversation(cid)
    await valkey.delete(thread_entry(stack, ALICE))
    await valkey.delete(f"{stack.namespace}:thread-of:{{{cid}}}")
    await valkey.set(old_entry(stack, conv.end_user_id), cid)
    return str(conv.end_user_id)


async def test_a_thread_an_older_version_indexed_by_end_user_continues_after_the_upgrade(
    stack: Stack,
) -> None:
    valkey = raw(stack)
    await text(stack, "hello")
    await eventually(lambda: replies_to(stack, ALICE, 1), what="the first reply")
    (conv,) = await sms_conversations(stack)
    user = await as_an_older_version_left_it(stack, valkey, conv.id)

    await text(stack, "still there?")
    await eventually(lambda: replies_to(stack, ALICE, 2), what="the reply after the upgrade")
    assert [c.id for c in await sms_conversations(stack)] == [conv.id]  # no second conversation
    assert await user_texts(stack, conv.id) == ["hello", "still there?"]
    assert await valkey.get(thread_entry(stack, ALICE)) == conv.id.encode()
    assert await valkey.exists(old_entry(stack, user)) == 0  # moved, not copied


async def test_a_closed_thread_from_an_older_version_is_followed_by_a_new_conversation(
    stack: Stack,
) -> None:
    valkey = raw(stack)
    await text(stack, "hello")
    await eventually(lambda: replies_to(stack, ALICE, 1), what="the first reply")
    (old,) = await sms_conversations(stack)
    user = await as_an_older_version_left_it(stack, valkey, old.id)
    assert (await stack.api.post(f"/v1/conversations/{old.id}/close")).status_code == 200

    await text(stack, "me again")
    await eventually(lambda: replies_to(stack, ALICE, 2), what="the new conversation's reply")
    new, closed = await sms_conversations(stack)
    assert (closed.id, closed.status, new.status) == (old.id, "closed", "active")
    assert await user_texts(stack, new.id) == ["me again"]
    assert await valkey.get(thread_entry(stack, ALICE)) == new.id.encode()
    assert await valkey.exists(old_entry(stack, user)) == 0


async def test_two_linked_numbers_text_in_their_own_threads_and_each_is_answered_on_its_own(
    stack: Stack,
) -> None:
    valkey = raw(stack)
    """Decision: a thread per phone number. Versions before thread keys shared one conversation
    between linked numbers and answered all of them on the number that opened it; a texting
    person expects the answer on the phone they wrote from. The agent still sees both threads
    through the end user's history."""
    await text(stack, "hello from my phone")
    await eventually(lambda: replies_to(stack, ALICE, 1), what="the first reply")
    (first,) = await sms_conversations(stack)
    # An older version indexed it by end user: a linked number must not take it over.
    user = await as_an_older_version_left_it(stack, valkey, first.id)
    operator = await make_key(stack, "operator")
    async with stack.client(operator) as api:
        linked = await api.post(
            "/v1/identity/link",
            json={"end_user_id": user, "channel": "sms", "identifier": ALICE_WORK},
        )
    assert linked.status_code == 200, linked.text

    await text(stack, "and from my work phone", sender=ALICE_WORK)
    await eventually(lambda: replies_to(stack, ALICE_WORK, 1), what="the work phone's reply")
    work, mine = await sms_conversations(stack)
    assert (mine.id, work.end_user_id, work.user_address) == (first.id, user, ALICE_WORK)
    assert await user_texts(stack, work.id) == ["and from my work phone"]
    assert await valkey.get(old_entry(stack, user)) == first.id.encode()  # still Alice's phone's

    await text(stack, "back on my phone")
    await eventually(lambda: replies_to(stack, ALICE, 2), what="the phone's second reply")
    assert await user_texts(stack, first.id) == ["hello from my phone", "back on my phone"]
    assert len(sent_messages(stack, ALICE_WORK)) == 1  # nothing of the phone's went to work
    assert len(await sms_conversations(stack)) == 2
    assert await valkey.exists(old_entry(stack, user)) == 0

    # Erasing Alice removes both threads' entries (and their pointers).
    assert (await stack.api.delete(f"/v1/end-users/{user}")).status_code == 200
    left = [key async for key in valkey.scan_iter(match=f"{stack.namespace}:thread*")]
    assert left == []


async def test_opening_an_sms_conversation_for_a_number_mid_thread_in_the_old_index_is_409(
    stack: Stack,
) -> None:
    valkey = raw(stack)
    await stack.restart_core(sms_from_number=OUR_NUMBER)
    await text(stack, "hello")
    await eventually(lambda: replies_to(stack, ALICE, 1), what="the first reply")
    (conv,) = await sms_conversations(stack)
    await as_an_older_version_left_it(stack, valkey, conv.id)
    body = {"channel": "sms", "identity": {"channel": "sms", "identifier": ALICE}}
    refused = await stack.api.post("/v1/conversations", json=body)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "conversation_exists"
    assert refused.json()["error"]["details"]["conversation_id"] == conv.id
    assert await valkey.get(thread_entry(stack, ALICE)) == conv.id.encode()


# The store's side, without the stack ---------------------------------------------------------------


async def sms_conversation(store: Store, cid: str, user_address: str) -> Conversation:
    fields = {"channel": "sms", "our_address": OUR_NUMBER, "user_address": user_address}
    return await new_conversation(store, cid, **fields)


async def test_a_thread_is_claimed_once_and_replaced_only_where_it_named_the_closed_one(
    store: Store,
) -> None:
    key = f"{ALICE}|{OUR_NUMBER}"
    assert await store.claim_thread("sms", key, "conv_a", None) == "conv_a"
    assert await store.claim_thread("sms", key, "conv_b", None) == "conv_a"  # a/b raced: a won
    assert await store.claim_thread("sms", key, "conv_c", "conv_x") == "conv_a"  # stale previous
    assert await store.claim_thread("sms", key, "conv_d", "conv_a") == "conv_d"  # a closed
    assert await store.thread_conversation("sms", key) == "conv_d"
    assert await store.thread_conversation("voice", key) is None  # per channel


async def test_the_old_index_moves_only_to_the_thread_of_the_number_that_opened_it(
    store: Store, namespace: str
) -> None:
    r = store.connection.redis
    old = f"{namespace}:open:{{usr_1}}:sms:{OUR_NUMBER}"
    await sms_conversation(store, "conv_1", ALICE)
    await r.set(old, "conv_1")
    work = f"{ALICE_WORK}|{OUR_NUMBER}"
    assert await store.adopt_legacy_thread("sms", work, "usr_1", OUR_NUMBER, ALICE_WORK) is None
    assert await r.get(old) == b"conv_1"  # left for the number that opened it
    mine = f"{ALICE}|{OUR_NUMBER}"
    assert await store.adopt_legacy_thread("sms", mine, "usr_1", OUR_NUMBER, ALICE) == "conv_1"
    assert (await r.get(old), await store.thread_conversation("sms", mine)) == (None, "conv_1")
    assert await store.adopt_legacy_thread("sms", mine, "usr_1", OUR_NUMBER, ALICE) is None  # once


async def test_an_old_entry_naming_a_conversation_that_is_gone_is_dropped(
    store: Store, namespace: str
) -> None:
    r = store.connection.redis
    old = f"{namespace}:open:{{usr_1}}:sms:{OUR_NUMBER}"
    await r.set(old, "conv_gone")
    key = f"{ALICE}|{OUR_NUMBER}"
    assert await store.adopt_legacy_thread("sms", key, "usr_1", OUR_NUMBER, ALICE) is None
    assert (await r.exists(old), await store.thread_conversation("sms", key)) == (0, None)
