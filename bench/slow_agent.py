"""The slow-agent scenario: an `http` bot that takes a second to answer every turn.

- A burst: `conversations` API conversations each send one turn at the same moment. When no
  conversation waits for another's agent call, every reply lands within about one bot-second of the
  first; 16 partitions answered one message at a time would need conversations / 16 bot-seconds
  (400 → ~25 s).
- Texting: `senders` phones each text `texts` times, `gap_ms` apart, to a number routed to the bot:
  every reply must reach the Twilio fake, in the order its sender texted.

The bot is a minimal HTTP/1.1 server in this process (keep-alive, one JSON answer per POST after
`bot_seconds`), so it costs the gateway's cores next to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

import msgspec
from twilio.request_validator import RequestValidator

from bench.client import Config, Connection, HttpError, hostport
from bench.cpu import GatewayCpu
from bench.sms import sent_sms

BOT_SECRET = "bench-bot-secret-0123456789"


async def _bot(seconds: float) -> tuple[asyncio.Server, int]:
    """A bot that answers `{"text": "answer to <message>"}` after `seconds`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                request = await reader.readline()
                if not request:
                    return
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                context = msgspec.json.decode(await reader.readexactly(length))
                await asyncio.sleep(seconds)
                body = msgspec.json.encode({"text": f"answer to {context['message']['text']}"})
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=2048)
    return server, server.sockets[0].getsockname()[1]


async def _json(conn: Connection, method: str, path: str, key: str, body: object) -> Any:
    headers = {"x-api-key": key, "content-type": "application/json"}
    status, answer = await conn.request(method, path, msgspec.json.encode(body), headers)
    if status >= 300:
        raise HttpError(f"{method} {path}: {status} {answer[:200]!r}")
    return msgspec.json.decode(answer)


async def slow_agent(cfg: Config) -> Config:
    server, port = await _bot(cfg["bot_seconds"])
    api = await Connection.open(*hostport(cfg["api"]))
    try:
        agent = await _json(
            api,
            "POST",
            "/v1/agents",
            cfg["key"],
            {
                "name": "Slow bot",
                "revision": {
                    "runtime": "http",
                    "http": {
                        "url": f"http://127.0.0.1:{port}/bot",
                        "secret": BOT_SECRET,
                        "timeout_seconds": cfg["bot_seconds"] * 10,
                    },
                },
            },
        )
        agent_id = str(agent["id"])
        burst = await _burst(cfg, api, agent_id)
    finally:
        await api.close()
    # A fresh connection: the server may close one left idle through the burst.
    api = await Connection.open(*hostport(cfg["api"]))
    try:
        texting = await _texting(cfg, api, agent_id)
    finally:
        await api.close()
        server.close()
    return {"bot_seconds": cfg["bot_seconds"], "burst": burst, "texting": texting}


async def _burst(cfg: Config, api: Connection, agent_id: str) -> Config:
    count = cfg["conversations"]
    body = {"agent_id": agent_id}
    conversations = [
        str((await _json(api, "POST", "/v1/conversations", cfg["key"], body))["id"])
        for _ in range(count)
    ]
    conns = [await Connection.open(*hostport(cfg["api"])) for _ in range(count)]
    headers = {"x-api-key": cfg["key"], "content-type": "application/json"}
    answered: list[float] = []
    errors: dict[str, int] = {}
    first_error: list[str] = []
    go = asyncio.Event()

    async def one(conn: Connection, cid: str) -> None:
        body = msgspec.json.encode({"user_message": f"burst {cid}"})
        await go.wait()
        status, answer = await conn.request("POST", f"/v1/conversations/{cid}/turns", body, headers)
        if status == 200:
            answered.append(time.perf_counter())
        else:
            errors[str(status)] = errors.get(str(status), 0) + 1
            first_error[:] = first_error or [answer.decode(errors="replace")[:300]]

    tasks = [asyncio.create_task(one(c, cid)) for c, cid in zip(conns, conversations, strict=True)]
    await asyncio.sleep(0.1)  # every task waiting on the start line
    cpu = GatewayCpu(cfg.get("gateway_pid"))
    before = cpu.snapshot()
    started = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    spent = GatewayCpu.per_operation(before, cpu.snapshot(), count, time.perf_counter() - started)
    for conn in conns:
        await conn.close()
    first, last = (min(answered), max(answered)) if answered else (started, started)
    return {
        "conversations": count,
        "answered": len(answered),
        "errors": errors,
        "first_error": first_error[0] if first_error else None,
        "first_reply_s": round(first - started, 2),
        "last_reply_s": round(last - started, 2),
        # Only a burst answered in full has a spread: a missing reply is not a fast one.
        "spread_s": round(last - first, 2) if len(answered) == count else float("inf"),
        "one_at_a_time_per_partition_s": round(count / cfg["partitions"] * cfg["bot_seconds"], 1),
        "cpu": spent,
    }


async def _texting(cfg: Config, api: Connection, agent_id: str) -> Config:
    ours, url = cfg["our_number"], cfg["sms_url"]
    await _json(api, "PUT", f"/v1/routes/{ours}", cfg["key"], {"agent_id": agent_id})
    fake = await Connection.open(*hostport(cfg["twilio_fake"]))
    await fake.request("POST", "/_fake/reset", b"", {})
    validator = RequestValidator(cfg["auth_token"])
    path = urlsplit(url).path
    senders = [f"+1555{cfg['prefix']}{i:06d}" for i in range(cfg["senders"])]
    texts = cfg["texts"]
    errors: dict[str, int] = {}

    async def texting(index: int, sender: str) -> None:
        conn = await Connection.open(*hostport(url))
        try:
            for n in range(texts):
                form = {
                    "MessageSid": f"SM{cfg['prefix']}{index:016x}{n:015x}",
                    "AccountSid": cfg["account_sid"],
                    "From": sender,
                    "To": ours,
                    "Body": f"text {n + 1}",
                    "NumMedia": "0",
                }
                headers = {
                    "content-type": "application/x-www-form-urlencoded",
                    "x-twilio-signature": validator.compute_signature(url, form),
                }
                status, _ = await conn.request("POST", path, urlencode(form).encode(), headers)
                if status != 200:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                await asyncio.sleep(cfg["gap_ms"] / 1000)
        finally:
            await conn.close()

    started = time.monotonic()
    await asyncio.gather(*(texting(i, s) for i, s in enumerate(senders)))
    replies: dict[str, list[str]] = {}
    deadline = time.monotonic() + cfg.get("drain_seconds", 120)
    try:
        while time.monotonic() < deadline:
            replies = {}
            for sent in await sent_sms(fake):
                text = sent["form"].get("Body", "")
                if text.startswith("answer to "):
                    replies.setdefault(sent["form"].get("To"), []).append(text)
            if sum(len(r) for r in replies.values()) >= len(senders) * texts:
                break
            await asyncio.sleep(0.2)
        await fake.request("POST", "/_fake/reset", b"", {})
    finally:
        await fake.close()
    expected = [f"answer to text {n + 1}" for n in range(texts)]
    in_order = sum(1 for s in senders if replies.get(s) == expected)
    return {
        "senders": len(senders),
        "texts_each": texts,
        "gap_ms": cfg["gap_ms"],
        "replies": sum(len(r) for r in replies.values()),
        "of": len(senders) * texts,
        "senders_in_order": in_order,
        "errors": errors,
        "all_replied_s": round(time.monotonic() - started, 2),
    }
