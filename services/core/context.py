"""Building what the agent sees of a turn (`AgentContext`) from the store, once per turn.

History spans the end user's channels: the newest few of their conversations are read (one
pipeline of LRANGEs over each conversation's tail), merged by time, and cut to a window. Runtimes
that ignore history (the builtin playbook) skip that read and the end user's identities: a
builtin turn costs no Valkey round trip here.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec

from services.core.agent.context import (
    AgentContext,
    ConversationInfo,
    EndUserInfo,
    HistoryTurn,
    UserMessage,
)
from services.core.agent.registry import Runtimes
from services.core.agent.runtime import Runtime
from shared.errors import NotFound
from shared.models import Conversation, Identity, Revision, Turn
from shared.store import Store

# How many of the end user's conversations the history reads.
HISTORY_CONVERSATIONS = 5


async def build_context(
    store: Store,
    runtimes: Runtimes,
    runtime: Runtime,
    conv: Conversation,
    user_turn: Turn,
    revision: Revision,
    *,
    history_turns: int,
) -> AgentContext:
    index = runtimes.index_for(revision)
    identities: tuple[Identity, ...] = ()
    history: tuple[HistoryTurn, ...] = ()
    if runtime.wants_history:
        # An end user lost to a partial write (or erased): the turn is still answered.
        with contextlib.suppress(NotFound):
            identities = (await store.get_end_user(conv.end_user_id)).identities
        if history_turns > 0:
            history = await recent_history(store, conv, user_turn, history_turns)
    return AgentContext(
        conversation=ConversationInfo(
            id=conv.id,
            channel=conv.channel,
            session_type=conv.session_type,
            agent_id=conv.assigned_agent_id,
            revision_id=conv.pinned_revision_id,
        ),
        end_user=EndUserInfo(id=conv.end_user_id, identities=identities),
        message=UserMessage(
            seq=user_turn.seq,
            text=user_turn.content,
            channel=user_turn.channel or conv.channel,
            created_at=user_turn.created_at,
        ),
        history=history,
        context_variables=conv.context_variables,
        evidence=tuple(index.search(user_turn.content)) if index is not None else (),
        tools=runtimes.tools_of(revision),
    )


async def recent_history(
    store: Store, conv: Conversation, user_turn: Turn, limit: int
) -> tuple[HistoryTurn, ...]:
    """The end user's last `limit` turns before `user_turn`, on any channel, oldest first."""
    ids = await store.end_user_conversation_ids(conv.end_user_id, HISTORY_CONVERSATIONS)
    if conv.id not in ids:
        ids.append(conv.id)
    conversations = {c.id: c for c in await store.get_conversations(ids)}
    turns: list[tuple[Any, Turn]] = []
    for cid, other in conversations.items():
        last = user_turn.seq - 1 if cid == conv.id else other.last_seq
        first = max(0, last - limit)
        for turn in await store.turns_after(cid, first, last - first):
            if cid != conv.id and turn.created_at >= user_turn.created_at:
                continue
            turns.append(
                (
                    turn.created_at,
                    msgspec.structs.replace(turn, channel=turn.channel or other.channel),
                )
            )
    turns.sort(key=lambda pair: pair[0])
    return tuple(
        HistoryTurn(
            conversation_id=turn.conversation_id,
            channel=turn.channel,
            seq=turn.seq,
            role=turn.role,
            text=turn.content,
            created_at=turn.created_at,
        )
        for _, turn in turns[-limit:]
    )
