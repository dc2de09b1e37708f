"""Tools the builtin runtime can call, and the policy check that decides whether it may."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared.models import Policy, Revision

# The demo shop's order table.
ORDERS = {"12345": "shipped", "67890": "processing"}


def lookup_order(order_id: str) -> dict[str, Any]:
    status = ORDERS.get(order_id)
    if status is None:
        return {"order_id": order_id, "found": False}
    return {"order_id": order_id, "found": True, "status": status}


def issue_refund(order_id: str) -> dict[str, Any]:
    if order_id not in ORDERS:
        return {"order_id": order_id, "refunded": False, "reason": "unknown order"}
    return {"order_id": order_id, "refunded": True}


TOOLS: dict[str, Callable[..., dict[str, Any]]] = {
    "lookup_order": lookup_order,
    "issue_refund": issue_refund,
}
# Tools that change the world: never run in a simulation.
SIDE_EFFECTS = frozenset({"issue_refund"})


def policy_for(revision: Revision, tool: str) -> Policy:
    for policy in revision.policies:
        if policy.tool == tool:
            return policy
    return Policy(tool=tool, decision="allow")


def run_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return TOOLS[name](**arguments)
