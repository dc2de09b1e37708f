"""The one bus wrapper: NATS connection life cycle, JetStream streams, publish, ordered consume.

Delivery is at-least-once. A consumer's handler is called; when it returns the message is acked,
when it raises `Undeliverable` the message goes to the DEAD stream at once, and when it raises
anything else it is redelivered with backoff until `max_deliver`, then dead-lettered with the reason.

Two kinds of outage are not the message's fault and never spend its deliveries:
- NATS or Valkey down (`TRANSIENT`): the consumer keeps the message in hand and retries in place.
- A provider down (`ProviderUnavailable`: the SMTP relay, Twilio 5xx/429, a customer's endpoint):
  on a consumer with a `Hold`, the message is nak'd with a jittered exponential delay (the
  consumer's `max_deliver` is unlimited, so nothing is spent) until it is `Hold.horizon` seconds
  old, counted from when JetStream stored it (durable: no state of ours). Past the horizon it is
  dead-lettered like any other failure. `max_ack_pending=1` consumers keep their order: a nak'd
  message stays pending, so nothing behind it overtakes it. Other failures of a held message are
  counted by this process against `max_deliver` (JetStream's count includes the outage).

Before any dead letter, the consumer's `on_dead` hook runs (egress marks the delivery `failed`
and raises `delivery.failed`). Dead letters can be listed and replayed (`dead_letters`, `replay`).
"""

from __future__ import annotations

from shared.bus.consumers import Consumers
from shared.bus.replies import Reply, ReplyInbox, decode_reply
from shared.bus.types import (
    DAY,
    NOT_STORED,
    TRANSIENT,
    Backoff,
    DeadHook,
    DeadLetterEntry,
    Delivery,
    Handler,
    Hold,
    Later,
    ProviderUnavailable,
    Undeliverable,
    decode_or_dead,
    short_backoff,
)

__all__ = [
    "DAY",
    "NOT_STORED",
    "TRANSIENT",
    "Backoff",
    "Bus",
    "DeadHook",
    "DeadLetterEntry",
    "Delivery",
    "Handler",
    "Hold",
    "Later",
    "ProviderUnavailable",
    "Reply",
    "ReplyInbox",
    "Undeliverable",
    "decode_or_dead",
    "decode_reply",
    "short_backoff",
]


class Bus(Consumers):
    """The one bus wrapper (connection, publishing, request/reply, consumers, dead letters)."""
