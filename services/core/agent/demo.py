"""The demo agent, "Acme Support", seeded at start-up when it is missing."""

from __future__ import annotations

from shared.errors import NotFound
from shared.models import Agent, Document, KnowledgeBase, Policy, Revision, ToolSpec, utcnow
from shared.store import Store

DEMO_KB = KnowledgeBase(
    id="acme-help",
    documents=(
        Document(
            id="refunds",
            title="Refunds",
            text="Refunds are issued to the original payment method within 14 days of "
            "receiving the returned item.",
        ),
        Document(
            id="shipping",
            title="Shipping",
            text="Standard shipping takes 3-5 business days; express shipping takes 1-2 "
            "business days.",
        ),
        Document(
            id="hours",
            title="Support hours",
            text="Our support team is available Monday to Friday, 9am to 5pm Eastern time.",
        ),
    ),
)

DEMO_TOOLS = (
    ToolSpec(
        name="lookup_order",
        description="Look up an order's status.",
        parameters={"order_id": "string"},
    ),
    ToolSpec(
        name="issue_refund", description="Refund an order.", parameters={"order_id": "string"}
    ),
    ToolSpec(name="transfer_call", description="Hand the conversation to a human."),
)

DEMO_POLICIES = (
    Policy(tool="issue_refund", decision="require_approval", timeout_seconds=24 * 3600),
)


async def seed_demo_agent(store: Store, agent_id: str) -> bool:
    """Create the demo agent with revision 1 active, unless an agent with that id exists."""
    try:
        await store.get_agent(agent_id)
        return False
    except NotFound:
        pass
    now = utcnow()
    revision = Revision(
        id=f"{agent_id}_rev1",
        agent_id=agent_id,
        number=await store.next_revision_number(agent_id),
        created_at=now,
        knowledge_base=DEMO_KB,
        tools=DEMO_TOOLS,
        policies=DEMO_POLICIES,
        greeting="Hi, this is Acme Support. How can I help you today?",
    )
    await store.put_revision(revision)
    await store.put_agent(
        Agent(id=agent_id, name="Acme Support", created_at=now, active_revision_id=revision.id)
    )
    return True
