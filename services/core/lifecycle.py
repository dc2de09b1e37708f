"""The conversation state machine: a table of legal transitions and the one function applying it."""

from __future__ import annotations

from shared.models import Status
from shared.store import Store

TRANSITIONS: frozenset[tuple[Status, Status]] = frozenset(
    {
        ("active", "waiting_for_human"),  # handoff: agent tool, workflow node or operator
        ("waiting_for_human", "active"),  # the human hands back
        ("active", "awaiting_approval"),  # a policy holds a tool call
        ("awaiting_approval", "active"),  # approved (or rejected with on_reject=continue)
        ("awaiting_approval", "closed"),  # rejected or timed out
        ("active", "closed"),
        ("waiting_for_human", "closed"),
    }
)

# Statuses in which a user message is accepted (answered at once only when `active`).
ACCEPTS_USER_TURNS: tuple[Status, ...] = ("active", "waiting_for_human", "awaiting_approval")


def legal_sources(to: Status) -> list[Status]:
    return sorted(src for src, dst in TRANSITIONS if dst == to)


async def transition(store: Store, conversation_id: str, to: Status, reason: str = "") -> Status:
    """Apply one transition atomically in the store; returns the previous status.

    Raises IllegalTransition (or ConversationClosed) carrying the current status otherwise.
    """
    return await store.transition(conversation_id, to, legal_sources(to), reason)
