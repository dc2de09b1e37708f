"""The load generator: one scenario per run, in its own process, result as JSON on stdout.

    python -m bench.load SCENARIO 'CONFIG-JSON'

It runs apart from the gateway's processes on purpose: the servers and the load share the
machine's cores, as they would on one host, and the report says so.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiosmtplib
import msgspec
import redis.asyncio as redis
from aiosmtpd.controller import Controller
from twilio.request_validator import RequestValidator

from bench.client import Connection, HttpError, Latencies

TURN_TEXT = "how long do refunds take?"
Config = dict[str, Any]


def _hostport(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


class Api:
    """The gateway's HTTP API over one keep-alive connection."""

    def __init__(self, conn: Connection, key: str) -> None:
        self.conn = conn
        self.headers = {"x-api-key": key, "content-type": "application/json"}

    @classmethod
    async def open(cls, cfg: Config) -> Api:
        return cls(await Connection.open(*_hostport(cfg["api"])), cfg["key"])

    async def conversation(self) -> str:
        status, body = await self.conn.request("POST", "/v1/conversations", b"{}", self.headers)
        if status != 201:
            raise HttpError(f"open conversation: {status} {body[:200]!r}")
        return str(msgspec.json.decode(body)["id"])

    async def turn(self, conv_id: str, text: str = TURN_TEXT) -> int:
        body = msgspec.json.encode({"user_message": text})
        status, _ = await self.conn.request(
            "POST", f"/v1/conversations/{conv_id}/turns", body, self.headers
        )
        return status


async def closed_loop(
    workers: int, duration: float, warmup: float, step: Callable[[int], Awaitable[int]]
) -> Config:
    """`workers` loops calling `step` back to back; counts and times what lands after warm-up."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    started = time.perf_counter()
    measure_from, end = started + warmup, started + warmup + duration

    async def worker(index: int) -> None:
        while (now := time.perf_counter()) < end:
            status = await step(index)
            done = time.perf_counter()
            if now >= measure_from:
                if status in (200, 201):
                    latencies.append(done - now)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return {
        "concurrency": workers,
        "seconds": duration,
        "per_second": round(len(latencies) / duration, 1),
        "latency": Latencies(latencies).summary(),
        "errors": errors,
    }


async def ceiling(cfg: Config) -> Config:
    body = msgspec.json.encode({"user_message": TURN_TEXT})
    headers = {"content-type": "application/json"}
    conns = [await Connection.open(*_hostport(cfg["url"])) for _ in range(cfg["concurrency"])]

    async def step(i: int) -> int:
        status, _ = await conns[i].request("POST", "/v1/conversations/c/turns", body, headers)
        return status

    result = await closed_loop(cfg["concurrency"], cfg["duration"], cfg["warmup"], step)
    for conn in conns:
        await conn.close()
    return result


async def api_turns(cfg: Config) -> Config:
    """Synchronous turns at a fixed concurrency, one conversation per client (a conversation's
    turns are ordered, so one conversation is one client at a time)."""
    clients = [await Api.open(cfg) for _ in range(cfg["concurrency"])]
    convs = [await client.conversation() for client in clients]

    async def step(i: int) -> int:
        return await clients[i].turn(convs[i])

    result = await closed_loop(cfg["concurrency"], cfg["duration"], cfg["warmup"], step)
    for client in clients:
        await client.conn.close()
    return result


async def sms(cfg: Config) -> Config:
    """Signed Twilio webhooks at a fixed rate (open loop: latency counts from the moment a request
    was due, so a stall is not hidden by sending less). Every message comes from its own number;
    the reply to it is found in the Twilio fake's log by that number."""
    url = cfg["sms_url"]
    path = urlsplit(url).path
    validator = RequestValidator(cfg["auth_token"])
    rate, duration = cfg["rate"], cfg["duration"]
    count = int(rate * duration)
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(cfg.get("connections", 32)):
        pool.put_nowait(await Connection.open(*_hostport(url)))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    due_at: dict[str, float] = {}  # sender -> wall clock when its message was due
    first_error: list[str] = []

    async def send(i: int, due: float) -> None:
        sender = f"+1555{cfg['prefix']}{i:06d}"
        form = {
            "MessageSid": f"SM{cfg['prefix']}{i:031x}",
            "AccountSid": cfg["account_sid"],
            "From": sender,
            "To": cfg["our_number"],
            "Body": TURN_TEXT,
            "NumMedia": "0",
        }
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "x-twilio-signature": validator.compute_signature(url, form),
        }
        body = urlencode(form).encode()
        conn = await pool.get()
        try:
            status, answer = await conn.request("POST", path, body, headers)
        finally:
            pool.put_nowait(conn)
        if status != 200 and not first_error:
            first_error.append(answer.decode(errors="replace")[:300])
        if status == 200:
            latencies.append(time.perf_counter() - due)
            due_at[sender] = time.time() - (time.perf_counter() - due)
        else:
            errors[str(status)] = errors.get(str(status), 0) + 1

    tasks = []
    start = time.perf_counter() + 0.05
    for i in range(count):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i, due)))
    await asyncio.gather(*tasks)
    sent_seconds = time.perf_counter() - start
    egress = await _sms_egress(cfg, due_at)
    while not pool.empty():
        await pool.get_nowait().close()
    return {
        "rate": rate,
        "sent": count,
        "achieved_rate": round(count / sent_seconds, 1),
        "ack": Latencies(latencies).summary(),
        "errors": errors,
        "first_error": first_error[0] if first_error else None,
        "turn_to_egress": egress,
    }


async def _sms_egress(cfg: Config, due_at: dict[str, float]) -> Config:
    """Wait for a reply to every accepted message at the Twilio fake; latency = arrival - due."""
    fake = await Connection.open(*_hostport(cfg["twilio_fake"]))
    deadline = time.monotonic() + cfg.get("drain_seconds", 60)
    arrived: dict[str, float] = {}
    try:
        while time.monotonic() < deadline:
            status, body = await fake.request(
                "GET", "/_fake/requests?path_contains=Messages.json", b"", {}
            )
            if status != 200:
                raise HttpError(f"twilio fake: {status}")
            for sent in msgspec.json.decode(body):
                to = sent["form"].get("To")
                if to in due_at and to not in arrived:
                    arrived[to] = sent["at"]
            if len(arrived) >= len(due_at):
                break
            await asyncio.sleep(0.5)
    finally:
        await fake.close()
    latencies = [arrived[to] - due_at[to] for to in arrived]
    return {"replied": len(arrived), "of": len(due_at), "latency": Latencies(latencies).summary()}


async def email(cfg: Config) -> Config:
    """Mail over SMTP on parallel connections; a message counts once the server said 250 to its
    DATA, which it says only after the envelope is in JetStream. A local relay sink counts the
    replies egress sends back."""
    replies: list[float] = []

    class Sink:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            replies.append(time.perf_counter())
            return "250 OK"

    sink = Controller(Sink(), hostname="127.0.0.1", port=cfg["relay_port"])
    sink.start()
    count, connections = cfg["count"], cfg["connections"]
    latencies: list[float] = []
    errors = 0

    async def sender(worker: int) -> None:
        nonlocal errors
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=cfg["smtp_port"], timeout=30)
        await smtp.connect()
        for i in range(worker, count, connections):
            msg = EmailMessage()
            msg["From"] = f"bench{cfg['prefix']}-{i}@example.com"
            msg["To"] = cfg["to"]
            msg["Subject"] = "Refund question"
            msg["Message-ID"] = f"<bench-{cfg['prefix']}-{i}@example.com>"
            msg.set_content(f"Hello,\n\n{TURN_TEXT}\n\nThanks")
            began = time.perf_counter()
            try:
                await smtp.send_message(msg)
                latencies.append(time.perf_counter() - began)
            except aiosmtplib.SMTPException:
                errors += 1
        await smtp.quit()

    began = time.perf_counter()
    await asyncio.gather(*(sender(w) for w in range(connections)))
    seconds = time.perf_counter() - began
    deadline = time.monotonic() + cfg.get("drain_seconds", 60)
    while len(replies) < len(latencies) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)  # the sink runs in its own thread; polling is simplest
    sink.stop()
    return {
        "sent": count,
        "accepted": len(latencies),
        "connections": connections,
        "per_second": round(len(latencies) / seconds, 1),
        "accept_latency": Latencies(latencies).summary(),
        "replies_relayed": len(replies),
        "errors": errors,
    }


async def history(cfg: Config) -> Config:
    """Does turn N of a conversation cost more than turn 1? One conversation is grown to `turns`
    turns; then, `window` times, the first turn of a fresh conversation and the next turn of the
    long one are timed back to back, so host noise hits both sides alike."""
    api = await Api.open(cfg)
    long_conv = await api.conversation()
    for n in range(cfg["turns"] - 1):
        if await api.turn(long_conv) != 200:
            raise HttpError(f"turn {n + 1} failed")
    first: list[float] = []
    late: list[float] = []
    for _ in range(cfg.get("window", 50)):
        fresh = await api.conversation()
        for conv, samples in ((fresh, first), (long_conv, late)):
            began = time.perf_counter()
            if await api.turn(conv) != 200:
                raise HttpError("turn failed")
            samples.append(time.perf_counter() - began)
    await api.conn.close()
    first_ms = statistics.median(first) * 1000
    late_ms = statistics.median(late) * 1000
    return {
        "turns": cfg["turns"] + len(late) - 1,
        "first_turns_p50_ms": round(first_ms, 2),
        "last_turns_p50_ms": round(late_ms, 2),
        "ratio": round(late_ms / first_ms, 3),
        "window": len(late),
    }


async def memory(cfg: Config) -> Config:
    """Valkey's used memory before and after `conversations` conversations of `turns` turns."""
    store = redis.from_url(cfg["redis_url"])
    apis = [await Api.open(cfg) for _ in range(cfg.get("concurrency", 8))]
    # A first conversation warms lazily created structures (indexes, the agent) out of the delta.
    await apis[0].turn(await apis[0].conversation())
    before = int((await store.info("memory"))["used_memory"])
    queue = list(range(cfg["conversations"]))

    async def worker(api: Api) -> None:
        while queue:
            queue.pop()
            conv = await api.conversation()
            for _ in range(cfg["turns"]):
                if await api.turn(conv, "where is my order?") != 200:
                    raise HttpError("turn failed")

    await asyncio.gather(*(worker(api) for api in apis))
    after = int((await store.info("memory"))["used_memory"])
    await store.aclose()
    for api in apis:
        await api.conn.close()
    per_conversation = (after - before) / cfg["conversations"]
    return {
        "conversations": cfg["conversations"],
        "turns_per_conversation": cfg["turns"],
        "bytes_per_conversation": round(per_conversation),
        "bytes_per_turn": round(per_conversation / cfg["turns"]),
    }


SCENARIOS: dict[str, Callable[[Config], Coroutine[Any, Any, Config]]] = {
    "ceiling": ceiling,
    "api_turns": api_turns,
    "sms": sms,
    "email": email,
    "history": history,
    "memory": memory,
}


def main() -> None:
    name, cfg = sys.argv[1], json.loads(sys.argv[2])
    try:
        import uvloop

        result: Config = uvloop.run(SCENARIOS[name](cfg))
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        result = asyncio.run(SCENARIOS[name](cfg))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
