"""The builtin playbook runtime: intent rules, tools under policies, and knowledge-base answers.

Rules, in order: a request for a person hands off (`transfer_call`); a message naming an order
number calls `issue_refund` (when it asks for a refund) or `lookup_order`; a question the
knowledge base answers is answered from it, citing evidence; a greeting is greeted; anything else
gets the revision's fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from services.core.agent.knowledge import KnowledgeIndex
from services.core.agent.tools import SIDE_EFFECTS, policy_for, run_tool
from shared.models import Evidence, Policy, Revision, ToolCall

_HUMAN = re.compile(
    r"\b(human|humans|person|people|representative|rep|operator|real agent|live agent|"
    r"an agent|someone real|talk to someone|speak to someone|agent please)\b",
    re.IGNORECASE,
)
_ORDER = re.compile(r"\border\b\D{0,20}?(\d{4,10})\b|#(\d{4,10})\b", re.IGNORECASE)
_REFUND = re.compile(r"\brefund", re.IGNORECASE)
_GREETING = re.compile(
    r"^\s*(hi|hello|hey|good (morning|afternoon|evening))\b[\s!.,]*$", re.IGNORECASE
)
# A knowledge answer needs at least this BM25 score: one rare shared term, not a stop-word echo.
MIN_SCORE = 0.5


@dataclass(frozen=True)
class PendingToolCall:
    """A tool call a policy holds for a human's approval."""

    name: str
    arguments: dict[str, Any]
    policy: Policy


@dataclass(frozen=True)
class AgentReply:
    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    evidence: tuple[Evidence, ...] = ()
    handoff: bool = False
    approval: PendingToolCall | None = None
    # Token-sized pieces of `text`, for streaming clients.
    deltas: tuple[str, ...] = field(default=())


def _order_id(text: str) -> str | None:
    match = _ORDER.search(text)
    return (match.group(1) or match.group(2)) if match else None


def _order_answer(result: dict[str, Any]) -> str:
    if not result.get("found", True):
        return f"I couldn't find order {result['order_id']}. Could you check the number?"
    if "refunded" in result:
        if result["refunded"]:
            return f"Done: the refund for order {result['order_id']} has been issued."
        return (
            f"I couldn't refund order {result['order_id']}: {result.get('reason', 'not eligible')}."
        )
    return f"Order {result['order_id']} is {result['status']}."


class Runtime:
    """One revision, compiled: its knowledge index is built once and reused for every turn."""

    def __init__(self, revision: Revision) -> None:
        self.revision = revision
        self.index = KnowledgeIndex(revision.knowledge_base) if revision.knowledge_base else None
        self.tool_names = {tool.name for tool in revision.tools}

    def reply(self, text: str, *, simulate: bool = False) -> AgentReply:
        # Platform tools that hand the conversation to a person: `transfer_call` (every channel;
        # on voice it also dials the human queue) or a workflow's `handoff` node.
        handoff_tool = next((t for t in ("transfer_call", "handoff") if t in self.tool_names), None)
        if _HUMAN.search(text) and handoff_tool is not None:
            call = ToolCall(
                name=handoff_tool,
                arguments={"reason": "user asked for a person"},
                result={"transferred": True},
            )
            return AgentReply(
                text="Let me connect you with a member of our team.",
                tool_calls=(call,),
                handoff=True,
            )
        order_id = _order_id(text)
        if order_id is not None:
            tool = "issue_refund" if _REFUND.search(text) else "lookup_order"
            if tool in self.tool_names:
                return self.call_tool(tool, {"order_id": order_id}, simulate=simulate)
        if self.index is not None:
            evidence = [e for e in self.index.search(text) if e.score >= MIN_SCORE]
            if evidence:
                top = evidence[0].score
                cited = tuple(e for e in evidence if e.score >= top * 0.5)
                return AgentReply(text=cited[0].text, evidence=cited)
        if _GREETING.match(text):
            return AgentReply(text=self.revision.greeting)
        return AgentReply(text=self.revision.fallback)

    def call_tool(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        simulate: bool = False,
        approved: bool = False,
    ) -> AgentReply:
        """Run a tool under the revision's policy (skipped for approved calls)."""
        policy = policy_for(self.revision, name)
        if not approved and policy.decision == "deny":
            call = ToolCall(
                name=name,
                arguments=arguments,
                decision="deny",
                result={"error": "denied by policy"},
            )
            return AgentReply(text="Sorry, I'm not able to do that.", tool_calls=(call,))
        if not approved and policy.decision == "require_approval":
            call = ToolCall(name=name, arguments=arguments, decision="require_approval")
            return AgentReply(
                text=policy.suspend_message,
                tool_calls=(call,),
                approval=PendingToolCall(name, arguments, policy),
            )
        if simulate and name in SIDE_EFFECTS:
            result: dict[str, Any] = {"simulated": True, **arguments}
            call = ToolCall(name=name, arguments=arguments, result=result)
            return AgentReply(text=f"(simulation) {name} would run now.", tool_calls=(call,))
        result = run_tool(name, arguments)
        call = ToolCall(
            name=name,
            arguments=arguments,
            result=result,
            decision="allow" if not approved else "approved",
        )
        return AgentReply(text=_order_answer(result), tool_calls=(call,))


_cache: dict[str, Runtime] = {}


def runtime_for(revision: Revision) -> Runtime:
    """Revisions are immutable, so a compiled runtime is cached by revision id for good."""
    runtime = _cache.get(revision.id)
    if runtime is None:
        runtime = _cache[revision.id] = Runtime(revision)
    return runtime
