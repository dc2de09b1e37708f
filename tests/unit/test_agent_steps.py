"""Core's step loop and the openai prompt, with scripted runtimes (no network, no servers)."""

from __future__ import annotations

from typing import Any

import httpx

from services.core.agent.context import (
    AgentContext,
    ConversationInfo,
    EndUserInfo,
    HistoryTurn,
    ToolOutcome,
    UserMessage,
)
from services.core.agent.openai_runtime import messages_for
from services.core.agent.runtime import AgentReply, DeltaSink, ProposedToolCall, RuntimeFailed
from services.core.agent.steps import MAX_STEPS, run_steps, tool_key
from services.core.agent.tools import ToolRunner, json_schema
from shared.models import OpenAIRuntimeConfig, Policy, Revision, ToolSpec, utcnow
from tests.unit.test_agent import MemoryLedger


class Scripted:
    """A runtime that answers from a list, recording what it was shown."""

    wants_history = False

    def __init__(self, *replies: AgentReply | RuntimeFailed) -> None:
        self.replies = list(replies)
        self.seen: list[AgentContext] = []

    async def reply(self, context: AgentContext, on_delta: DeltaSink | None = None) -> AgentReply:
        self.seen.append(context)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, RuntimeFailed):
            raise reply
        return reply


def context(text: str = "hi") -> AgentContext:
    return AgentContext(
        conversation=ConversationInfo(
            id="conv", channel="sms", session_type="live", agent_id="a", revision_id="rev"
        ),
        end_user=EndUserInfo(id="usr"),
        message=UserMessage(seq=3, text=text, channel="sms", created_at=utcnow()),
    )


def revision(*tools: str, policies: tuple[Policy, ...] = ()) -> Revision:
    return Revision(
        id="rev",
        agent_id="a",
        number=1,
        created_at=utcnow(),
        tools=tuple(ToolSpec(name=t) for t in tools),
        policies=policies,
        fallback="fallback text",
    )


async def steps(runtime: Scripted, rev: Revision, ledger: MemoryLedger | None = None) -> Any:
    async with httpx.AsyncClient() as http:
        return await run_steps(
            runtime,
            context(),
            rev,
            ToolRunner(lambda: http),
            ledger or MemoryLedger(),
            turn_key="k",
        )


def call(name: str, **arguments: Any) -> AgentReply:
    return AgentReply(tool_calls=(ProposedToolCall(name=name, arguments=arguments),))


async def test_a_tool_the_revision_does_not_declare_is_denied_and_the_runtime_told() -> None:
    runtime = Scripted(call("drop_tables"), AgentReply(text="ok"))
    answer = await steps(runtime, revision("lookup_order"))
    assert answer.text == "ok"
    told = runtime.seen[1].tool_results
    assert [(o.name, o.decision, o.result) for o in told] == [
        ("drop_tables", "deny", {"error": "unknown_tool"})
    ]


async def test_a_policy_deny_never_runs_the_tool() -> None:
    runtime = Scripted(call("issue_refund", order_id="12345"), AgentReply(text="no refund"))
    rev = revision("issue_refund", policies=(Policy(tool="issue_refund", decision="deny"),))
    ledger = MemoryLedger()
    answer = await steps(runtime, rev, ledger)
    assert answer.tool_calls[0].decision == "deny"
    assert ledger.results == {}  # nothing ran, nothing recorded


async def test_a_call_that_acts_is_recorded_and_a_redelivered_turn_reads_it() -> None:
    ledger = MemoryLedger()
    rev = revision("issue_refund")
    first = await steps(
        Scripted(call("issue_refund", order_id="12345"), AgentReply(text="a")), rev, ledger
    )
    key = tool_key("k", "issue_refund", {"order_id": "12345"})
    assert ledger.results == {key: {"order_id": "12345", "refunded": True}}
    assert first.tool_calls[0].result == {"order_id": "12345", "refunded": True}
    ledger.results[key] = {"recorded": True}  # what the first run left; the tool must not run
    runtime = Scripted(call("issue_refund", order_id="12345"), AgentReply(text="b"))
    await steps(runtime, rev, ledger)
    assert runtime.seen[1].tool_results[0].result == {"recorded": True}


async def test_a_read_only_demo_tool_is_not_put_on_record() -> None:
    ledger = MemoryLedger()
    answer = await steps(
        Scripted(call("lookup_order", order_id="12345"), AgentReply(text="a")),
        revision("lookup_order"),
        ledger,
    )
    assert answer.tool_calls[0].result["status"] == "shipped"
    assert ledger.results == {}


async def test_a_runtime_that_keeps_calling_tools_is_stopped_with_the_fallback() -> None:
    runtime = Scripted(call("lookup_order", order_id="1"))
    answer = await steps(runtime, revision("lookup_order"))
    assert answer.text == "fallback text"
    assert answer.failure == "too_many_tool_steps"
    assert len(runtime.seen) == MAX_STEPS


async def test_a_proposed_transfer_call_hands_off() -> None:
    answer = await steps(Scripted(call("transfer_call", reason="angry")), revision("transfer_call"))
    assert answer.handoff
    assert answer.tool_calls[0].name == "transfer_call"
    assert answer.text == "Let me connect you with a member of our team."


async def test_a_failed_runtime_leaves_the_fallback_and_the_reason() -> None:
    answer = await steps(Scripted(RuntimeFailed("http_500", attempts=3)), revision())
    assert (answer.text, answer.failure, answer.attempts) == ("fallback text", "http_500", 3)


async def test_require_approval_ends_the_turn_with_the_pending_call_and_its_earlier_steps() -> None:
    runtime = Scripted(
        call("lookup_order", order_id="12345"), call("issue_refund", order_id="12345")
    )
    rev = revision(
        "lookup_order",
        "issue_refund",
        policies=(Policy(tool="issue_refund", decision="require_approval"),),
    )
    answer = await steps(runtime, rev)
    assert answer.approval is not None
    assert answer.approval.name == "issue_refund"
    assert [s.name for s in answer.approval.steps] == ["lookup_order"]
    assert answer.text == Policy(tool="x").suspend_message


def test_short_parameters_become_a_json_schema() -> None:
    assert json_schema({"order_id": "string"}) == {
        "type": "object",
        "properties": {"order_id": {"type": "string"}},
        "required": ["order_id"],
    }
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert json_schema(schema) == schema


def test_the_prompt_marks_other_channels_and_carries_tool_results() -> None:
    config = OpenAIRuntimeConfig(model="m", system_prompt="Be brief.", max_history_turns=1)
    ctx = AgentContext(
        conversation=context().conversation,
        end_user=EndUserInfo(id="usr"),
        message=UserMessage(seq=3, text="and now?", channel="sms", created_at=utcnow()),
        history=tuple(
            HistoryTurn(
                conversation_id=cid,
                channel="email",
                seq=seq,
                role="user",
                text=text,
                created_at=utcnow(),
            )
            for cid, seq, text in (("c0", 1, "old"), ("c1", 2, "by mail"))
        ),
        context_variables={"tier": "gold"},
        tool_results=(
            ToolOutcome(id="c1", name="t", arguments={"a": 1}, decision="deny", result=None),
        ),
    )
    messages = messages_for(config, ctx)
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("Be brief.")
    assert '"tier": "gold"' in messages[0]["content"]
    assert messages[1] == {"role": "user", "content": "[via email] by mail"}  # window of 1
    assert messages[2] == {"role": "user", "content": "and now?"}
    assert messages[3]["tool_calls"][0]["function"] == {"name": "t", "arguments": '{"a": 1}'}
    assert messages[4] == {
        "role": "tool",
        "tool_call_id": "c1",
        "content": '{"error": "denied by policy"}',
    }
