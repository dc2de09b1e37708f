"""Putting messages on a test's own streams and consuming them, for the bus tests."""

from __future__ import annotations

from typing import Any

from shared.bus import Bus, Handler


async def publish(bus: Bus, subject: str, *payloads: bytes) -> None:
    """Each payload on `subject`, in order; its message id is the payload itself."""
    for payload in payloads:
        await bus.publish(subject, payload, msg_id=payload.decode())


async def consume_inbound(bus: Bus, durable: str, handler: Handler, **options: Any) -> None:
    """`handler` on every inbound subject, through the durable consumer `durable`."""
    await bus.consume(
        stream=bus.subjects.inbound_stream,
        durable=durable,
        filter_subject=bus.subjects.inbound_all,
        handler=handler,
        **options,
    )


async def consume_outbound(
    bus: Bus, durable: str, handler: Handler, filter_subject: str | None = None, **options: Any
) -> None:
    """`handler` on the outbound subjects (all of them unless `filter_subject` narrows them)."""
    await bus.consume(
        stream=bus.subjects.outbound_stream,
        durable=durable,
        filter_subject=filter_subject or bus.subjects.outbound_all,
        handler=handler,
        **options,
    )
