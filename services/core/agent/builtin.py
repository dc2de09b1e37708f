"""The builtin playbook runtime: intent rules, tools proposed to core, knowledge-base answers.

Rules, in order: a request for a person hands off (`transfer_call`); a message naming an order
number proposes `issue_refund` (when it asks for a refund) or `lookup_order`, and answers from the
tool's result; a question the knowledge base answers is answered from it, citing evidence; a
greeting is greeted; anything else gets the revision's fallback.
"""

from __future__ import annotations

import re
from typing import Any

from services.core.agent.context import AgentContext, ToolOutcome
from services.core.agent.runtime import AgentReply, DeltaSink, ProposedToolCall
from shared.models import Revision

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


def _outcome_answer(outcome: ToolOutcome) -> str:
    if outcome.decision in ("deny", "require_approval"):
        return "Sorry, I'm not able to do that."
    result = outcome.result if isinstance(outcome.result, dict) else {}
    if result.get("simulated"):
        return f"(simulation) {outcome.name} would run now."
    if "error" in result:
        return "Sorry, something went wrong on our side. Please try again later."
    try:
        return _order_answer(result)
    except KeyError:  # a customer's tool of the same name, answering in its own shape
        return "Done."


class BuiltinRuntime:
    """The keyword playbook. Tool calls are proposed to core, which runs them under the
    revision's policies and asks again with the result; the answer is then read off it."""

    wants_history = False

    def __init__(self, revision: Revision) -> None:
        self.revision = revision
        self.tool_names = {tool.name for tool in revision.tools}

    async def reply(self, context: AgentContext, on_delta: DeltaSink | None = None) -> AgentReply:
        if context.tool_results:
            return AgentReply(text=_outcome_answer(context.tool_results[-1]))
        text = context.message.text
        # Platform tools that hand the conversation to a person: `transfer_call` (every channel;
        # on voice it also dials the human queue) or a workflow's `handoff` node.
        handoff_tool = next((t for t in ("transfer_call", "handoff") if t in self.tool_names), None)
        if _HUMAN.search(text) and handoff_tool is not None:
            return AgentReply(
                text=self.revision.holding_message,
                tool_calls=(
                    ProposedToolCall(
                        name=handoff_tool, arguments={"reason": "user asked for a person"}
                    ),
                ),
            )
        order_id = _order_id(text)
        if order_id is not None:
            tool = "issue_refund" if _REFUND.search(text) else "lookup_order"
            if tool in self.tool_names:
                return AgentReply(
                    tool_calls=(ProposedToolCall(name=tool, arguments={"order_id": order_id}),)
                )
        evidence = [e for e in context.evidence if e.score >= MIN_SCORE]
        if evidence:
            top = evidence[0].score
            cited = tuple(e for e in evidence if e.score >= top * 0.5)
            return AgentReply(text=cited[0].text, evidence=cited)
        if _GREETING.match(text):
            return AgentReply(text=self.revision.greeting)
        return AgentReply(text=self.revision.fallback)
