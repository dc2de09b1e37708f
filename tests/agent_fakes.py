"""Real local HTTP servers standing in for what customers plug into Switchboard: bots behind the
`http` runtime, an OpenAI-compatible chat-completions server (the real wire format, streamed
chunks and `tool_calls` included, for the official SDK), and a tool server that counts calls by
`Idempotency-Key`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from litestar import Litestar, Request, Response, post
from litestar.response import Stream

from shared.http import HttpServer


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Fakes:
    """What the fake servers saw, and the knobs tests turn."""

    requests: list[Seen] = field(default_factory=list)
    # Failures to serve before answering properly, per path.
    failures_before_success: dict[str, int] = field(default_factory=dict)
    tool_calls: Counter[str] = field(default_factory=Counter)  # by Idempotency-Key
    # The bot's step that carries tool results waits here while set (to crash core meanwhile).
    hold_tool_step: asyncio.Event | None = None
    held: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    # `/gate` holds a message that says "wait" until `gate` is set (`gated`: one is held).
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    gated: asyncio.Event = field(default_factory=asyncio.Event)

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == path]


async def _record(fakes: Fakes, request: Request[Any, Any, Any]) -> Seen:
    seen = Seen(request.url.path, dict(request.headers), await request.body())
    fakes.requests.append(seen)
    return seen


def _fail(fakes: Fakes, path: str) -> bool:
    left = fakes.failures_before_success.get(path, 0)
    if left > 0:
        fakes.failures_before_success[path] = left - 1
        return True
    return False


def bot_app(fakes: Fakes) -> Litestar:
    @post("/echo", status_code=200)
    async def echo(request: Request[Any, Any, Any]) -> Any:
        seen = await _record(fakes, request)
        if _fail(fakes, "/echo"):
            return Response({"error": "try again"}, status_code=503)
        context = seen.json
        return {"text": f"echo: {context['message']['text']}"}

    @post("/slow", status_code=200)
    async def slow(request: Request[Any, Any, Any]) -> Any:
        seen = await _record(fakes, request)
        await asyncio.sleep(0.4)
        return {"text": f"slowly: {seen.json['message']['text']}"}

    @post("/hang", status_code=200)
    async def hang(request: Request[Any, Any, Any]) -> Any:
        await _record(fakes, request)
        await fakes.release.wait()
        return {"text": "too late"}

    @post("/gate", status_code=200)
    async def gate(request: Request[Any, Any, Any]) -> Any:
        seen = await _record(fakes, request)
        text = seen.json["message"]["text"]
        if "wait" in text:
            fakes.gated.set()
            await fakes.gate.wait()
        return {"text": f"echo: {text}"}

    @post("/error", status_code=200)
    async def error(request: Request[Any, Any, Any]) -> Any:
        await _record(fakes, request)
        return Response({"error": "boom"}, status_code=500)

    @post("/garbage", status_code=200)
    async def garbage(request: Request[Any, Any, Any]) -> Any:
        await _record(fakes, request)
        return Response(b"<html>not json", media_type="application/json")

    @post("/stream", status_code=200)
    async def stream(request: Request[Any, Any, Any]) -> Stream:
        seen = await _record(fakes, request)
        words = ["Streaming ", "reply ", "to: ", seen.json["message"]["text"]]

        async def events() -> AsyncIterator[bytes]:
            yield b": a comment line, ignored\n\n"
            for word in words:
                yield f"event: delta\ndata: {json.dumps({'text': word})}\n\n".encode()
                await asyncio.sleep(0.01)
            yield b"event: done\ndata: {}\n\n"

        return Stream(events(), media_type="text/event-stream")

    @post("/tools", status_code=200)
    async def tools(request: Request[Any, Any, Any]) -> Any:
        """Proposes the tool named in the message (`use <tool> <order>`), then answers with
        what came back."""
        seen = await _record(fakes, request)
        context = seen.json
        if context["tool_results"]:
            if fakes.hold_tool_step is not None and fakes.hold_tool_step.is_set():
                fakes.held.set()
                await fakes.release.wait()
            last = context["tool_results"][-1]
            return {"text": f"{last['name']} {last['decision']}: {json.dumps(last['result'])}"}
        match = re.search(r"use (\w+) (\d+)", context["message"]["text"])
        if match is None:
            return {"text": "nothing to do"}
        return {"tool_calls": [{"name": match[1], "arguments": {"order_id": match[2]}}]}

    @post("/handoff", status_code=200)
    async def handoff(request: Request[Any, Any, Any]) -> Any:
        await _record(fakes, request)
        return {"text": "A colleague will take it from here.", "handoff": True}

    return Litestar([echo, slow, hang, gate, error, garbage, stream, tools, handoff])


def tool_app(fakes: Fakes) -> Litestar:
    @post("/refund", status_code=200)
    async def refund(request: Request[Any, Any, Any]) -> Any:
        seen = await _record(fakes, request)
        key = seen.headers.get("idempotency-key", "")
        fakes.tool_calls[key] += 1
        order = seen.json["arguments"].get("order_id")
        return {"refunded": True, "order_id": order, "refund_id": f"rf_{order}_ok"}

    @post("/plan", status_code=200)
    async def plan(request: Request[Any, Any, Any]) -> Any:
        seen = await _record(fakes, request)
        fakes.tool_calls[seen.headers.get("idempotency-key", "")] += 1
        return {"plan": "gold", "order_id": seen.json["arguments"].get("order_id")}

    return Litestar([refund, plan])


# The chat-completions wire format ---------------------------------------------------------------


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


def model_answer(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
    """What the fake model says: after a tool result, a sentence using it; for a refund request
    when `issue_refund` is offered, that tool call; otherwise how much it knows and an echo."""
    last = messages[-1]
    if last["role"] == "tool":
        result = json.loads(last["content"])
        if "refund_id" in result:
            return {"content": f"Your refund is done, reference {result['refund_id']}."}
        return {"content": f"The tool said: {last['content']}"}
    offered = {t["function"]["name"] for t in tools}
    match = re.search(r"refund (?:order )?(\d+)", last["content"])
    if match and "issue_refund" in offered:
        return {
            "tool_calls": [
                {"id": "call_r1", "name": "issue_refund", "arguments": {"order_id": match[1]}}
            ]
        }
    earlier = sum(1 for m in messages[1:-1] if m["role"] in ("user", "assistant"))
    return {"content": f"I know {earlier} earlier messages. You said: {last['content']}"}


def openai_app(fakes: Fakes) -> Litestar:
    @post("/v1/chat/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Any:
        seen = await _record(fakes, request)
        if _fail(fakes, "/v1/chat/completions"):
            return Response({"error": {"message": "overloaded", "type": "server_error"}}, 503)
        body = seen.json
        answer = model_answer(body["messages"], body.get("tools", []))
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": answer.get("content")}
            if "tool_calls" in answer:
                message["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
                    }
                    for c in answer["tool_calls"]
                ]
            return {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if "tool_calls" in answer else "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        async def chunks() -> AsyncIterator[bytes]:
            yield _chunk({"role": "assistant", "content": ""})
            if "tool_calls" in answer:
                for index, call in enumerate(answer["tool_calls"]):
                    arguments = json.dumps(call["arguments"])
                    head = {
                        "index": index,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["name"], "arguments": ""},
                    }
                    yield _chunk({"tool_calls": [head]})
                    # Arguments arrive in pieces, as real servers send them.
                    for start in range(0, len(arguments), 7):
                        piece = arguments[start : start + 7]
                        yield _chunk(
                            {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                        )
                yield _chunk({}, finish="tool_calls")
            else:
                for word in re.findall(r"\S+\s*", answer["content"]):
                    yield _chunk({"content": word})
                yield _chunk({}, finish="stop")
            yield b"data: [DONE]\n\n"

        return Stream(chunks(), media_type="text/event-stream")

    return Litestar([completions])


class FakeServers:
    """The bot, tool and model servers on free local ports."""

    def __init__(self) -> None:
        self.fakes = Fakes()
        self.bot = HttpServer(bot_app(self.fakes), "127.0.0.1", 0)
        self.tools = HttpServer(tool_app(self.fakes), "127.0.0.1", 0)
        self.model = HttpServer(openai_app(self.fakes), "127.0.0.1", 0)

    async def start(self) -> None:
        await asyncio.gather(self.bot.start(), self.tools.start(), self.model.start())

    async def stop(self) -> None:
        self.fakes.release.set()
        self.fakes.gate.set()
        await asyncio.gather(self.bot.stop(), self.tools.stop(), self.model.stop())

    def bot_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.bot.port}{path}"

    def tool_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.tools.port}{path}"

    @property
    def model_url(self) -> str:
        return f"http://127.0.0.1:{self.model.port}/v1"
