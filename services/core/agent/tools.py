"""Running the tools an agent proposes: the demo's built-in ones and customers' HTTP tools.

A customer's tool is a URL: core POSTs `{"name", "arguments", "conversation_id"}` signed like
webhooks (when the tool has a secret), with an `Idempotency-Key` header derived from the turn and
the call, and reads back a JSON result. Retries of one call reuse its key, so a tool that honours
the key acts once however often it is asked. Core records each result in Valkey before it moves
on (`steps.py`), so a redelivered turn reads the result instead of calling again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from services.core.agent.context import ToolInfo
from shared.models import Policy, Revision, ToolSpec
from shared.signing import signature_headers

log = logging.getLogger("switchboard.core.tools")

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
# Tools that change the world: never run in a simulation. Customers' HTTP tools count as such.
SIDE_EFFECTS = frozenset({"issue_refund"})
# Platform tools: core acts on them itself (the conversation goes to a person).
HANDOFF_TOOLS = frozenset({"transfer_call", "handoff"})
TOOL_ATTEMPTS = 3


def policy_for(revision: Revision, tool: str) -> Policy:
    for policy in revision.policies:
        if policy.tool == tool:
            return policy
    return Policy(tool=tool, decision="allow")


def json_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters as a JSON schema; the short form `{"order_id": "string"}` (every
    parameter required) is expanded."""
    if parameters.get("type") == "object" or "properties" in parameters:
        return {"type": "object", **parameters}
    return {
        "type": "object",
        "properties": {
            name: kind if isinstance(kind, dict) else {"type": str(kind)}
            for name, kind in parameters.items()
        },
        "required": list(parameters),
    }


def offered_tools(revision: Revision) -> tuple[ToolInfo, ...]:
    return tuple(
        ToolInfo(name=t.name, description=t.description, parameters=json_schema(t.parameters))
        for t in revision.tools
    )


class ToolRunner:
    """Calls tools. Owns the HTTP client it calls customers' tools with."""

    def __init__(
        self, http: Callable[[], httpx.AsyncClient], retry_backoff_seconds: float = 0.25
    ) -> None:
        self.http = http
        self.backoff = retry_backoff_seconds

    async def run(
        self,
        spec: ToolSpec | None,
        name: str,
        arguments: dict[str, Any],
        *,
        idempotency_key: str,
        conversation_id: str,
        simulate: bool,
        secret: str = "",
    ) -> Any:
        if spec is not None and spec.url:
            if simulate:
                return {"simulated": True, **arguments}
            return await self._call_http(
                spec, spec.url, arguments, idempotency_key, conversation_id, secret
            )
        builtin = TOOLS.get(name)
        if builtin is None:
            return {"error": "unknown_tool", "message": f"no tool named {name}"}
        if simulate and name in SIDE_EFFECTS:
            return {"simulated": True, **arguments}
        try:
            return builtin(**arguments)
        except TypeError as exc:  # arguments that do not fit the tool
            return {"error": "invalid_arguments", "message": str(exc)}

    async def _call_http(
        self,
        spec: ToolSpec,
        url: str,
        arguments: dict[str, Any],
        key: str,
        conversation_id: str,
        secret: str,
    ) -> Any:
        body = msgspec.json.encode(
            {"name": spec.name, "arguments": arguments, "conversation_id": conversation_id}
        )
        headers = {
            "content-type": "application/json",
            "user-agent": "Switchboard-Tools/1",
            "idempotency-key": key,
        }
        error = ""
        for attempt in range(1, TOOL_ATTEMPTS + 1):
            if secret:
                headers.update(signature_headers(secret, body))
            try:
                response = await self.http().post(
                    url, content=body, headers=headers, timeout=spec.timeout_seconds
                )
                if response.status_code < 500:
                    if response.status_code >= 400:
                        return {"error": f"http_{response.status_code}"}
                    return msgspec.json.decode(response.content) if response.content else {}
                error = f"http_{response.status_code}"
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            except (msgspec.DecodeError, UnicodeDecodeError):  # (not UTF-8 inside a string)
                error = "invalid_json"
            log.info("tool attempt failed", extra={"tool": spec.name, "error": error})
            if attempt < TOOL_ATTEMPTS:
                await asyncio.sleep(self.backoff * attempt)
        return {"error": "tool_unavailable", "message": error}
