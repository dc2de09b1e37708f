"""The `http` runtime: the customer's own bot behind a URL.

Contract (README, "Plug in your own bot"): core POSTs the turn's `AgentContext` as JSON, signed
like webhooks (`X-Switchboard-Signature` over timestamp + body, `X-Switchboard-Timestamp`), with
`X-Switchboard-Turn` naming the turn and step (the same on every retry). The bot answers either

- `application/json`: `{"text": "...", "handoff": false, "tool_calls": [{"name", "arguments"}]}`
  (every field optional), or
- `text/event-stream`: `event: delta` frames with `data: {"text": "<piece>"}`, then optionally
  one `event: done` frame with the same JSON as above (its `text`, when given, is the whole reply;
  otherwise the pieces joined are).

Timeouts, connection errors, 5xx and bodies that are not that JSON are retried until the turn's
budget is spent; a 4xx is the bot saying no and is not retried. Once a streamed reply has sent
pieces to clients it is never retried (they would see the text twice): it fails instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from services.core.agent.context import AgentContext
from services.core.agent.runtime import (
    AgentReply,
    AttemptFailed,
    Attempts,
    Budget,
    DeltaSink,
    ProposedToolCall,
)
from shared.models import HttpRuntimeConfig
from shared.signing import signature_headers


class BotToolCall(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: dict[str, Any] = {}
    id: str | None = None


class BotAnswer(msgspec.Struct, frozen=True, kw_only=True):
    text: str | None = None
    handoff: bool = False
    tool_calls: tuple[BotToolCall, ...] = ()


class BotDelta(msgspec.Struct, frozen=True, kw_only=True):
    text: str


_answer = msgspec.json.Decoder(BotAnswer)
_delta = msgspec.json.Decoder(BotDelta)
_enc = msgspec.json.Encoder()


class HttpRuntime:
    wants_history = True

    def __init__(
        self,
        config: HttpRuntimeConfig,
        secret: str,
        http: Callable[[], httpx.AsyncClient],
        budget: Budget,
    ) -> None:
        self.config = config
        self.secret = secret
        self.http = http
        self.attempts = Attempts(budget, config.timeout_seconds, failures=(httpx.HTTPError,))

    async def reply(self, context: AgentContext, on_delta: DeltaSink | None = None) -> AgentReply:
        body = _enc.encode(context)
        turn = f"{context.conversation.id}:{context.message.seq}:{len(context.tool_results)}"

        attempt = functools.partial(self._attempt, body, turn, on_delta)
        return await self.attempts.within_budget(attempt, conversation_id=context.conversation.id)

    async def _attempt(
        self, body: bytes, turn: str, on_delta: DeltaSink | None, sent: list[str]
    ) -> AgentReply:
        headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "user-agent": "Switchboard-Agent/1",
            "x-switchboard-turn": turn,
        }
        if self.secret:
            headers.update(signature_headers(self.secret, body))
        async with self.http().stream(
            "POST", self.config.url, content=body, headers=headers, timeout=None
        ) as response:
            status = response.status_code
            if status >= 500:
                raise AttemptFailed(f"http_{status}")
            if status >= 400:
                raise AttemptFailed(f"http_{status}", retryable=False)
            kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind == "text/event-stream":
                return await self._read_stream(response, on_delta, sent)
            raw = await response.aread()
        try:
            answer = _answer.decode(raw)
        # (msgspec reports bytes that are not UTF-8 inside a string as UnicodeDecodeError)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise AttemptFailed(f"invalid_answer: {exc}") from exc
        return _reply(answer, answer.text or "", streamed=False)

    async def _read_stream(
        self, response: httpx.Response, on_delta: DeltaSink | None, sent: list[str]
    ) -> AgentReply:
        """Server-sent events (WHATWG HTML §9.2): `event:` and `data:` lines, a blank line ends
        an event; several `data:` lines of one event join with newlines."""
        event, data = "message", []
        done: BotAnswer | None = None
        async for line in response.aiter_lines():
            if line.startswith(":"):
                continue
            if line:
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
                continue
            if data:
                payload = "\n".join(data).encode()
                try:
                    if event == "done":
                        done = _answer.decode(payload)
                    else:
                        piece = _delta.decode(payload).text
                        sent.append(piece)
                        if on_delta is not None:
                            await on_delta(piece)
                except msgspec.DecodeError as exc:
                    raise AttemptFailed(f"invalid_event: {exc}") from exc
            event, data = "message", []
        text = done.text if done is not None and done.text is not None else "".join(sent)
        return _reply(done or BotAnswer(), text, streamed=bool(sent))


def _reply(answer: BotAnswer, text: str, *, streamed: bool) -> AgentReply:
    return AgentReply(
        text=text,
        handoff=answer.handoff,
        tool_calls=tuple(
            ProposedToolCall(name=c.name, arguments=c.arguments, id=c.id) for c in answer.tool_calls
        ),
        streamed=streamed and not answer.tool_calls,
    )
