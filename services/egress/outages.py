"""Provider outages as operators see them: one log line when a provider starts failing (with the
reason) and one when it answers again, instead of a line or a traceback per held message.

The lines carry a `console` field, which `switchboard up` prints under its banner. While a provider
is down, each held message logs only at DEBUG; the bus holds it (`shared.bus.Hold`).
"""

from __future__ import annotations

import logging
import time

import msgspec

from shared.bus import Bus, Delivery
from shared.envelopes import OutboundEnvelope
from shared.events import DeliveryFailed, make_event
from shared.models import Delivery as DeliveryRecord
from shared.models import utcnow
from shared.store import Store
from shared.telemetry import Metrics

log = logging.getLogger("switchboard.egress.outages")
_outbound = msgspec.json.Decoder(OutboundEnvelope)
_enc = msgspec.json.Encoder()


class Outages:
    """Which providers are failing now, since when, and how many attempts they refused."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._down: dict[str, tuple[float, int]] = {}  # provider -> (since, failed attempts)
        self.metrics = metrics

    def failed(self, provider: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.provider_refusals.labels(provider=provider).inc()
            self.metrics.provider_down.labels(provider=provider).set(1)
        if provider in self._down:
            since, count = self._down[provider]
            self._down[provider] = (since, count + 1)
            log.debug("still unavailable", extra={"provider": provider, "reason": reason})
            return
        self._down[provider] = (time.monotonic(), 1)
        line = f"provider outage begins: {provider} ({reason}); holding its messages"
        log.warning(line, extra={"provider": provider, "reason": reason, "console": line})

    def recovered(self, provider: str) -> None:
        if provider not in self._down:
            return
        since, count = self._down.pop(provider)
        if self.metrics is not None:
            self.metrics.provider_down.labels(provider=provider).set(0)
        lasted = time.monotonic() - since
        line = (
            f"provider outage ends: {provider} answers again after {lasted:.0f}s "
            f"({count} attempts held)"
        )
        log.warning(
            line,
            extra={
                "provider": provider,
                "seconds": round(lasted, 1),
                "failed_attempts": count,
                "console": line,
            },
        )

    def is_down(self, provider: str) -> bool:
        return provider in self._down


class FailedDeliveries:
    """The `on_dead` hook of the channel consumers: a reply that will not be delivered is marked
    `failed` on its delivery record and raises `delivery.failed` (audit log and webhooks)."""

    def __init__(self, bus: Bus, store: Store) -> None:
        self.bus = bus
        self.store = store

    async def mark(self, delivery: Delivery, reason: str) -> None:
        try:
            out = _outbound.decode(delivery.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # nothing to mark: the dead letter itself says what arrived
        if out.session_type == "simulation":
            return
        now = utcnow()
        record = await self.store.get_delivery(out.conversation_id, out.turn_id)
        if record is None:
            record = DeliveryRecord(
                turn_id=out.turn_id,
                conversation_id=out.conversation_id,
                channel=out.channel,
                status="failed",
                updated_at=now,
            )
        await self.store.put_delivery(
            msgspec.structs.replace(
                record,
                status="failed",
                error_message=record.error_message or reason[:500],
                updated_at=now,
            )
        )
        event = make_event(
            DeliveryFailed(
                turn_id=out.turn_id,
                channel=out.channel,
                seq=out.seq,
                reason=reason[:500],
                attempts=delivery.attempt,
            ),
            # One per stored message: a rerun of this hook is deduped, a replay's failure is new.
            id=f"evt_delivery.failed_{out.turn_id}_{int(delivery.stored_at * 1000)}",
            occurred_at=now,
            conversation_id=out.conversation_id,
            session_type=out.session_type,
            actor="egress",
        )
        await self.store.record_event(out.conversation_id, event)
        await self.bus.publish(
            self.bus.subjects.event(event.type), _enc.encode(event), msg_id=event.id
        )
        log.warning(
            "delivery failed",
            extra={
                "conversation_id": out.conversation_id,
                "turn_id": out.turn_id,
                "channel": out.channel,
                "reason": reason[:500],
            },
        )
