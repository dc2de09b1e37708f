"""SMS scenarios: signed Twilio webhooks at a fixed rate, and the highest rate of new
conversations the gateway keeps up with."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

import msgspec
from twilio.request_validator import RequestValidator

from bench.api import TURN_TEXT
from bench.client import Config, Connection, HttpError, Latencies, hostport


async def at_rate(cfg: Config, rate: float, duration: float, *, first: int) -> Config:
    """Signed Twilio webhooks at a fixed rate (open loop: latency counts from the moment a request
    was due, so a stall is not hidden by sending less). Every message comes from its own number
    (a new conversation each), numbered from `first`; the reply to it is found in the Twilio
    fake's log by that number."""
    url = cfg["sms_url"]
    path = urlsplit(url).path
    validator = RequestValidator(cfg["auth_token"])
    count = max(1, int(rate * duration))
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(cfg.get("connections", 32)):
        pool.put_nowait(await Connection.open(*hostport(url)))
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
    for n in range(count):
        due = start + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(first + n, due)))
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


async def sent_sms(fake: Connection) -> list[dict[str, Any]]:
    """Every SMS the Twilio fake was asked to send, oldest first: its `form` and arrival `at`."""
    status, body = await fake.request("GET", "/_fake/requests?path_contains=Messages.json", b"", {})
    if status != 200:
        raise HttpError(f"twilio fake: {status}")
    return list(msgspec.json.decode(body))


async def _sms_egress(cfg: Config, due_at: dict[str, float]) -> Config:
    """Wait for a reply to every accepted message at the Twilio fake; latency = arrival - due."""
    fake = await Connection.open(*hostport(cfg["twilio_fake"]))
    deadline = time.monotonic() + cfg.get("drain_seconds", 60)
    arrived: dict[str, float] = {}
    try:
        while time.monotonic() < deadline:
            for sent in await sent_sms(fake):
                to = sent["form"].get("To")
                if to in due_at and to not in arrived:
                    arrived[to] = sent["at"]
            if len(arrived) >= len(due_at):
                break
            await asyncio.sleep(0.2)
        # The next run starts from an empty log, so polling it stays cheap.
        await fake.request("POST", "/_fake/reset", b"", {})
    finally:
        await fake.close()
    latencies = [arrived[to] - due_at[to] for to in arrived]
    return {"replied": len(arrived), "of": len(due_at), "latency": Latencies(latencies).summary()}


def kept_up(run: Config, max_lag_ms: float) -> bool:
    """Every webhook accepted, every one answered, and the replies' p99 lag bounded: a backlog
    that grows for the whole step pushes the last replies' lag to a large part of the step."""
    egress = run["turn_to_egress"]
    return (
        not run["errors"]
        and egress["replied"] == run["sent"]
        and egress["latency"].get("p99_ms", float("inf")) <= max_lag_ms
    )


async def sms_capacity(cfg: Config) -> Config:
    """The highest sustained rate of new SMS conversations whose replies keep up, then the
    webhook ack latency at half that rate.

    Steps start at `start_rate` and double while the gateway keeps up (`kept_up`), then one step
    halfway between the last rate that kept up and the first that did not. Each step lasts
    `step_seconds` and waits for its replies before the next starts, so a step never inherits a
    backlog.
    """
    max_lag_ms, step_seconds = cfg.get("max_lag_ms", 2000.0), cfg["step_seconds"]
    steps: list[Config] = []
    first = 0

    async def step(rate: float) -> bool:
        nonlocal first
        run = await at_rate(cfg, rate, step_seconds, first=first)
        first += run["sent"]
        ok = kept_up(run, max_lag_ms)
        steps.append(
            {
                "rate": rate,
                "kept_up": ok,
                "ack_p99_ms": run["ack"].get("p99_ms"),
                "reply_p50_ms": run["turn_to_egress"]["latency"].get("p50_ms"),
                "reply_p99_ms": run["turn_to_egress"]["latency"].get("p99_ms"),
                "replied": run["turn_to_egress"]["replied"],
                "sent": run["sent"],
                "errors": run["errors"],
            }
        )
        return ok

    rate, capacity, failed_at = float(cfg["start_rate"]), 0.0, None
    while rate <= cfg["max_rate"] and len(steps) < cfg.get("max_steps", 8):
        if not await step(rate):
            failed_at = rate
            break
        capacity, rate = rate, rate * 2
    if failed_at is not None and capacity and len(steps) < cfg.get("max_steps", 8):
        middle = (capacity + failed_at) / 2
        if await step(middle):
            capacity = middle
    half = max(capacity, float(cfg["start_rate"])) / 2
    at_half = await at_rate(cfg, half, cfg["duration"], first=first)
    return {
        "capacity_per_second": capacity,
        "max_lag_ms": max_lag_ms,
        "step_seconds": step_seconds,
        "steps": steps,
        "at_half": at_half,
    }
