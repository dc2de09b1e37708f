"""What operators do: take over, write to the end user, hand back, close; and simulations."""

from __future__ import annotations

from services.core import turns
from services.core.conversations import Conversations
from services.core.handoffs import claim, hand_back, heal_record, require_assignee
from services.core.lifecycle import ACCEPTS_USER_TURNS
from shared.envelopes import (
    ClaimHandoff,
    HumanTurn,
    InboundMessage,
    Simulate,
    SimulationStop,
    StartHandoff,
)
from shared.errors import ConversationClosed, IllegalTransition, InvalidRequest
from shared.ids import ulid
from shared.models import Author, Conversation, Turn, utcnow


async def start_handoff(c: Conversations, cmd: StartHandoff) -> Conversation:
    """An operator takes over: the handoff is theirs from the start."""
    conv = await c.store.get_conversation(cmd.conversation_id)
    if conv.status == "waiting_for_human" and not conv.handoff_id:
        await heal_record(c, conv)  # a crash lost the record: write it rather than refuse
    else:
        await c.handoff(conv, cmd.reason, cmd.actor)
    current = await c.store.get_conversation(conv.id)
    if cmd.actor_name is not None and current.handoff_id:
        await claim(
            c,
            ClaimHandoff(
                handoff_id=current.handoff_id,
                operator_id=cmd.actor,
                operator_name=cmd.actor_name,
            ),
        )
        current = await c.store.get_conversation(conv.id)
    return current


async def human_turn(c: Conversations, cmd: HumanTurn) -> Conversation:
    """An operator's message goes to the end user on the conversation's own channel."""
    conv = await c.store.get_conversation(cmd.conversation_id)
    if conv.status == "closed":
        raise ConversationClosed("conversation is closed", details={"status": "closed"})
    if cmd.hand_back and conv.status != "waiting_for_human":
        raise IllegalTransition(
            f"conversation is {conv.status}; only a handed-off conversation can be handed back",
            details={"status": conv.status},
        )
    # Only the handoff's assignee speaks for us; an unclaimed handoff is claimed by who replies.
    await require_assignee(c, conv, cmd.operator_id, cmd.operator_name or cmd.operator_id)
    if cmd.content:
        await c.say(
            conv,
            cmd.content,
            author=Author(kind="operator", id=cmd.operator_id, name=cmd.operator_name),
            allowed=ACCEPTS_USER_TURNS,
        )
    if cmd.hand_back:
        await hand_back(c, conv, "handed_back", cmd.operator_id)
        await c.outbox.resume(conv, key=ulid())
    if cmd.close:
        return await c.close(conv.id, "closed_by_operator", cmd.operator_id)
    return await c.store.get_conversation(conv.id)


async def simulate(
    c: Conversations, cmd: Simulate
) -> tuple[Conversation, list[Turn], SimulationStop | None]:
    """Replay user turns against a revision: the full runtime, but nothing leaves the gateway.

    A tool call that needs an approval holds the conversation there (nobody approves in a
    simulation): later user turns are recorded, queued and never answered, and the result says
    which call held it and which turns went unanswered."""
    revision_id = cmd.revision_id
    if revision_id is None:
        agent = await c.store.get_agent(cmd.agent_id or c.settings.default_agent)
        revision_id = agent.active_revision_id
        if revision_id is None:
            raise InvalidRequest(f"agent {agent.id} has no active revision")
    user = await c.store.create_anonymous_user()
    conv = await c.open(
        channel="api",
        end_user_id=user,
        agent_id=None,
        revision_id=revision_id,
        session_type="simulation",
        actor=cmd.actor,
    )
    stopped: SimulationStop | None = None
    for index, text in enumerate(cmd.user_turns):
        await turns.apply_message(
            c,
            InboundMessage(
                id=f"env_{conv.id}_{index}",
                channel="api",
                received_at=utcnow(),
                session_type="simulation",
                conversation_id=conv.id,
                text=text,
            ),
        )
        if stopped is None and (await c.store.get_conversation(conv.id)).status == (
            "awaiting_approval"
        ):
            last = await c.store.turns_after(conv.id, 0, 10_000)
            held = next(
                (
                    call
                    for turn in reversed(last)
                    for call in turn.tool_calls
                    if call.decision == "require_approval"
                ),
                None,
            )
            stopped = SimulationStop(
                after_user_turn=index,
                tool=held.name if held else "",
                arguments=dict(held.arguments) if held else {},
                unanswered=tuple(cmd.user_turns[index + 1 :]),
            )
    conv = await c.close(conv.id, "simulation_complete", cmd.actor)
    return conv, await c.store.turns_after(conv.id, 0, 10_000), stopped
