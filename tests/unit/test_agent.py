"""The builtin runtime and the demo agent, as DESIGN.md describes them: each turn goes through
core's step loop (`run_steps`), which runs the tools the runtime proposes under the policies."""

from typing import Any

import httpx
import pytest

from services.core.agent.builtin import BuiltinRuntime
from services.core.agent.context import AgentContext, ConversationInfo, EndUserInfo, UserMessage
from services.core.agent.demo import DEMO_KB, DEMO_POLICIES, DEMO_TOOLS
from services.core.agent.knowledge import KnowledgeIndex, chunk_document, tokenize
from services.core.agent.steps import Answer, run_steps
from services.core.agent.tools import ToolRunner, offered_tools
from shared.models import Revision, utcnow


class MemoryLedger:
    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    async def recall(self, key: str) -> tuple[bool, Any]:
        return (key in self.results, self.results.get(key))

    async def record(self, key: str, result: Any) -> None:
        self.results[key] = result


class Demo:
    """A revision's builtin runtime, asked one message at a time through the step loop."""

    def __init__(self, revision: Revision) -> None:
        self.revision = revision
        self.runtime = BuiltinRuntime(revision)
        kb = revision.knowledge_base
        self.index = KnowledgeIndex(kb) if kb else None

    async def reply(self, text: str) -> Answer:
        context = AgentContext(
            conversation=ConversationInfo(
                id="conv", channel="api", session_type="test", agent_id="a", revision_id="rev"
            ),
            end_user=EndUserInfo(id="usr"),
            message=UserMessage(seq=1, text=text, channel="api", created_at=utcnow()),
            evidence=tuple(self.index.search(text)) if self.index else (),
            tools=offered_tools(self.revision),
        )
        async with httpx.AsyncClient() as http:
            return await run_steps(
                self.runtime,
                context,
                self.revision,
                ToolRunner(lambda: http),
                MemoryLedger(),
                turn_key="env:reply",
            )


@pytest.fixture(scope="module")
def demo() -> Demo:
    return Demo(
        Revision(
            id="rev",
            agent_id="a",
            number=1,
            created_at=utcnow(),
            knowledge_base=DEMO_KB,
            tools=DEMO_TOOLS,
            policies=DEMO_POLICIES,
        )
    )


@pytest.mark.parametrize(
    ("question", "document"),
    [
        ("how long do refunds take?", "refunds"),
        ("When will I get my money back after returning an item?", "refunds"),
        ("how long does express shipping take", "shipping"),
        ("what are your support hours?", "hours"),
        ("are you open on Monday?", "hours"),
    ],
)
def test_bm25_ranks_the_document_that_answers_first(question: str, document: str) -> None:
    results = KnowledgeIndex(DEMO_KB).search(question)
    assert results, question
    assert results[0].chunk_id.startswith(document + "#")
    assert results[0].kb_id == "acme-help"
    assert results == sorted(results, key=lambda e: e.score, reverse=True)


def test_rare_terms_outweigh_common_ones() -> None:
    index = KnowledgeIndex(DEMO_KB)
    express = index.search("express days")
    assert express[0].chunk_id == "shipping#0"
    # 'days' appears in two documents, 'express' only in one: the shared term scores lower alone.
    assert index.search("days")[0].score < express[0].score


def test_unrelated_questions_find_nothing() -> None:
    assert KnowledgeIndex(DEMO_KB).search("what is the capital of France") == []


def test_long_documents_are_chunked_by_sentence() -> None:
    text = " ".join(f"Sentence number {i} talks about topic {i}." for i in range(40))
    chunks = chunk_document("doc", text, max_words=30)
    assert len(chunks) > 5
    assert all(len(c.split()) <= 30 for _, c in chunks)
    assert " ".join(c for _, c in chunks) == text


def test_tokenizer_drops_stop_words_and_stems() -> None:
    assert tokenize("How long do refunds take?") == ["long", "refund", "take"]


async def test_general_question_is_answered_from_the_knowledge_base_with_evidence(
    demo: Demo,
) -> None:
    reply = await demo.reply("how long do refunds take?")
    assert "14 days" in reply.text
    assert reply.evidence[0].chunk_id == "refunds#0"
    assert reply.evidence[0].score > 0
    assert not reply.tool_calls


@pytest.mark.parametrize(
    ("text", "status"),
    [("status of order 12345", "shipped"), ("where is my order #67890?", "processing")],
)
async def test_order_questions_call_lookup_order(demo: Demo, text: str, status: str) -> None:
    reply = await demo.reply(text)
    assert reply.tool_calls[0].name == "lookup_order"
    assert reply.tool_calls[0].result["status"] == status
    assert status in reply.text


async def test_unknown_order_says_so(demo: Demo) -> None:
    reply = await demo.reply("what about order 99999")
    assert reply.tool_calls[0].result == {"order_id": "99999", "found": False}
    assert "couldn't find" in reply.text


async def test_refund_request_is_held_for_approval_by_policy(demo: Demo) -> None:
    reply = await demo.reply("please refund order 12345")
    assert reply.approval is not None
    assert reply.approval.name == "issue_refund"
    assert reply.tool_calls[0].decision == "require_approval"
    assert reply.tool_calls[0].result is None  # not run yet


@pytest.mark.parametrize(
    "text", ["I want to talk to a human", "can I speak to a representative", "get me a real person"]
)
async def test_asking_for_a_person_transfers(demo: Demo, text: str) -> None:
    reply = await demo.reply(text)
    assert reply.handoff
    assert reply.tool_calls[0].name == "transfer_call"


async def test_greeting_and_fallback(demo: Demo) -> None:
    assert (await demo.reply("hello")).text == demo.revision.greeting
    assert (await demo.reply("what is the capital of France")).text == demo.revision.fallback


async def test_a_workflow_handoff_node_hands_off_like_transfer_call() -> None:
    from shared.models import ToolSpec

    runtime = Demo(
        Revision(
            id="r2", agent_id="a", number=1, created_at=utcnow(), tools=(ToolSpec(name="handoff"),)
        )
    )
    reply = await runtime.reply("can I talk to a person?")
    assert reply.handoff
    assert reply.tool_calls[0].name == "handoff"


async def test_without_a_handoff_tool_the_agent_does_not_hand_off() -> None:
    runtime = Demo(Revision(id="r3", agent_id="a", number=1, created_at=utcnow()))
    assert not (await runtime.reply("can I talk to a person?")).handoff
