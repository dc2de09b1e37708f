"""One turn of the agent: ask the runtime, run what it proposes under the revision's policies,
give it the results, until it answers with text (or hands off, or a call waits for approval).

Every proposed call passes the policy before anything runs: `allow` runs it, `deny` tells the
runtime, `require_approval` ends the turn with the policy's suspend message and a pending
approval; when a person approves, `resume_after_approval` runs the call and asks the runtime
again. Each result is recorded in the ledger (Valkey) under a key derived from the turn and the
call before the next step, and that key is also the tool's `Idempotency-Key`: a redelivered turn
reads the recorded result instead of acting twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from services.core.agent.context import AgentContext, ToolOutcome
from services.core.agent.runtime import DeltaSink, Runtime, RuntimeFailed
from services.core.agent.tools import (
    HANDOFF_TOOLS,
    SIDE_EFFECTS,
    TOOLS,
    ToolRunner,
    policy_for,
)
from shared.models import Decision, Evidence, Policy, Revision, ToolCall

# Rounds of tool calls one turn may take before core stops asking.
MAX_STEPS = 5


class ToolLedger(Protocol):
    """Durable tool results of one conversation, by idempotency key."""

    async def recall(self, key: str) -> tuple[bool, Any]: ...

    async def record(self, key: str, result: Any) -> None: ...


@dataclass(frozen=True)
class PendingToolCall:
    """A tool call a policy holds for a human's approval, and the turn's steps before it."""

    name: str
    arguments: dict[str, Any]
    policy: Policy
    call_id: str = ""
    steps: tuple[ToolOutcome, ...] = ()


@dataclass(frozen=True)
class Answer:
    """What the agent answers this turn, after its tool calls ran: recorded and delivered."""

    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    evidence: tuple[Evidence, ...] = ()
    handoff: bool = False
    approval: PendingToolCall | None = None
    # The text already reached streaming clients piece by piece.
    streamed: bool = False
    # Why the runtime gave no answer (the text is then the revision's fallback).
    failure: str | None = None
    attempts: int = 0


def tool_key(scope: str, name: str, arguments: dict[str, Any]) -> str:
    """The idempotency key of one call in one turn: the same call proposed again (after a crash,
    or twice in a turn) is the same action."""
    canonical = json.dumps([name, arguments], sort_keys=True, separators=(",", ":"))
    return f"{scope}:{hashlib.sha256(canonical.encode()).hexdigest()[:24]}"


async def run_tool_once(
    runner: ToolRunner,
    ledger: ToolLedger,
    revision: Revision,
    name: str,
    arguments: dict[str, Any],
    *,
    key: str,
    conversation_id: str,
    simulate: bool,
    secrets: Mapping[str, str] | None = None,
) -> Any:
    spec = next((t for t in revision.tools if t.name == name), None)
    # Only a call that acts on the world needs its result on record: the demo's read-only
    # built-in tools just run again.
    durable = (spec is not None and bool(spec.url)) or name in SIDE_EFFECTS
    if durable:
        found, result = await ledger.recall(key)
        if found:
            return result
    result = await runner.run(
        spec,
        name,
        arguments,
        idempotency_key=key,
        conversation_id=conversation_id,
        simulate=simulate,
        secret=(secrets or {}).get(f"tool:{name}", ""),
    )
    if durable:
        await ledger.record(key, result)
    return result


async def run_steps(
    runtime: Runtime,
    context: AgentContext,
    revision: Revision,
    runner: ToolRunner,
    ledger: ToolLedger,
    *,
    turn_key: str,
    simulate: bool = False,
    on_delta: DeltaSink | None = None,
    approvals: bool = True,
    secrets: Mapping[str, str] | None = None,
) -> Answer:
    """Run the agent to an answer. `context.tool_results` holds steps taken before (a resumed
    turn); the answer's `tool_calls` are the calls decided in this run."""
    outcomes = list(context.tool_results)
    records: list[ToolCall] = []
    known = {t.name for t in revision.tools}
    for _ in range(MAX_STEPS):
        try:
            reply = await runtime.reply(
                msgspec.structs.replace(context, tool_results=tuple(outcomes)), on_delta
            )
        except RuntimeFailed as exc:
            return Answer(
                text=revision.fallback,
                tool_calls=tuple(records),
                failure=exc.reason,
                attempts=exc.attempts,
            )
        handoff = next((c for c in reply.tool_calls if c.name in HANDOFF_TOOLS), None)
        if reply.handoff or handoff is not None:
            records.append(
                ToolCall(
                    name=handoff.name if handoff else "handoff",
                    arguments=handoff.arguments if handoff else {"reason": "the agent handed off"},
                    result={"transferred": True},
                )
            )
            return Answer(
                text=reply.text or revision.holding_message,
                tool_calls=tuple(records),
                evidence=reply.evidence,
                handoff=True,
                streamed=reply.streamed,
            )
        if not reply.tool_calls:
            return Answer(
                text=reply.text,
                tool_calls=tuple(records),
                evidence=reply.evidence,
                streamed=reply.streamed,
            )
        for call in reply.tool_calls:
            call_id = call.id or f"call_{len(outcomes) + 1}"
            policy = policy_for(revision, call.name)
            decision: Decision
            result: Any
            if call.name not in known or (
                call.name not in TOOLS and not _has_url(revision, call.name)
            ):
                decision, result = "deny", {"error": "unknown_tool"}
            elif policy.decision == "deny":
                decision, result = "deny", {"error": "denied by policy"}
            elif policy.decision == "require_approval" and approvals:
                records.append(
                    ToolCall(name=call.name, arguments=call.arguments, decision="require_approval")
                )
                return Answer(
                    text=policy.suspend_message,
                    tool_calls=tuple(records),
                    evidence=reply.evidence,
                    approval=PendingToolCall(
                        call.name, call.arguments, policy, call_id, tuple(outcomes)
                    ),
                )
            elif policy.decision == "require_approval":
                # A turn resumed after one approval does not wait for a second one.
                decision = "require_approval"
                result = {"error": "needs approval: ask for it in a new message"}
            else:
                decision = "allow"
                result = await run_tool_once(
                    runner,
                    ledger,
                    revision,
                    call.name,
                    call.arguments,
                    key=tool_key(turn_key, call.name, call.arguments),
                    conversation_id=context.conversation.id,
                    simulate=simulate,
                    secrets=secrets,
                )
            outcome = ToolOutcome(
                id=call_id,
                name=call.name,
                arguments=call.arguments,
                decision=decision,
                result=result,
            )
            outcomes.append(outcome)
            records.append(
                ToolCall(
                    name=outcome.name,
                    arguments=outcome.arguments,
                    result=outcome.result,
                    decision=outcome.decision,
                )
            )
    return Answer(text=revision.fallback, tool_calls=tuple(records), failure="too_many_tool_steps")


def _has_url(revision: Revision, name: str) -> bool:
    return any(t.name == name and t.url for t in revision.tools)


def encode_steps(steps: tuple[ToolOutcome, ...]) -> list[Any]:
    """Steps as kept in an approval's payload (plain JSON)."""
    return [msgspec.to_builtins(step) for step in steps]


def decode_steps(raw: Any) -> tuple[ToolOutcome, ...]:
    return msgspec.convert(raw or [], tuple[ToolOutcome, ...])
