"""Email scenario: mail over SMTP in, replies counted at a local relay sink."""

from __future__ import annotations

import asyncio
import time
from email.message import EmailMessage
from typing import Any

import aiosmtplib
from aiosmtpd.controller import Controller

from bench.api import TURN_TEXT
from bench.client import Config, Latencies


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
