"""NATS subject and stream names, in one place.

A namespace prefixes every subject and stream so several gateways (or several tests) can share one
NATS server without seeing each other's traffic. The default namespace is empty: `gw.in.sms.3`.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _addressed(subject: str, inbox: str | None) -> str:
    """`subject.<inbox>`, if `inbox` is one plain subject token; anything else (None, or a value
    that would make another subject or a wildcard) leaves the subject unaddressed."""
    return f"{subject}.{inbox}" if inbox and _TOKEN.fullmatch(inbox) else subject


@dataclass(frozen=True)
class Subjects:
    namespace: str = ""
    partitions: int = 16

    def _s(self, subject: str) -> str:
        return f"{self.namespace}.{subject}" if self.namespace else subject

    def _stream(self, name: str) -> str:
        return f"{self.namespace.upper().replace('.', '_')}_{name}" if self.namespace else name

    # Streams and the subjects they hold.
    @property
    def inbound_stream(self) -> str:
        return self._stream("INBOUND")

    @property
    def outbound_stream(self) -> str:
        return self._stream("OUTBOUND")

    @property
    def events_stream(self) -> str:
        return self._stream("EVENTS")

    @property
    def dead_stream(self) -> str:
        return self._stream("DEAD")

    @property
    def inbound_all(self) -> str:
        return self._s("gw.in.>")

    @property
    def outbound_all(self) -> str:
        return self._s("gw.out.>")

    @property
    def events_all(self) -> str:
        return self._s("gw.evt.>")

    @property
    def dead_all(self) -> str:
        return self._s("gw.dead.>")

    # Concrete subjects.
    def partition_of(self, routing_key: str) -> int:
        """Stable across processes and restarts (unlike `hash()`), so replicas agree."""
        return zlib.crc32(routing_key.encode()) % self.partitions

    def inbound(self, channel: str, routing_key: str) -> str:
        return self._s(f"gw.in.{channel}.{self.partition_of(routing_key)}")

    def inbound_partition(self, partition: int) -> str:
        """Every channel's inbound subject for one partition: what one ordered consumer reads."""
        return self._s(f"gw.in.*.{partition}")

    def outbound(self, channel: str, recipient: str | None = None) -> str:
        """`gw.out.<channel>.<partition>` for channel messages: one ordered consumer per partition
        keeps each recipient's messages in order; `gw.out.<channel>` for unordered work."""
        if recipient is None:
            return self._s(f"gw.out.{channel}")
        return self._s(f"gw.out.{channel}.{self.partition_of(recipient)}")

    def outbound_partition(self, channel: str, partition: int) -> str:
        return self._s(f"gw.out.{channel}.{partition}")

    def event(self, event_type: str) -> str:
        return self._s(f"gw.evt.{event_type}")

    def operator_event(self, event_type: str) -> str:
        """Core NATS (never stored): what operators' screens follow, published while one is open
        (services/core/audience.py)."""
        return self._s(f"gw.ops.{event_type}")

    @property
    def operator_events_all(self) -> str:
        return self._s("gw.ops.>")

    def dead(self, source: str) -> str:
        return self._s(f"gw.dead.{source}")

    def command(self, verb: str) -> str:
        return self._s(f"gw.cmd.{verb}")

    @property
    def webhooks_changed(self) -> str:
        """Core NATS: the API announces a webhook subscription created or deleted (no payload)."""
        return self._s("gw.ctl.webhooks")

    @property
    def operators_watching(self) -> str:
        """Core NATS: the API announces an operators' stream opened (no payload)."""
        return self._s("gw.ctl.operators")

    @property
    def commands_all(self) -> str:
        return self._s("gw.cmd.>")

    @property
    def key_revoked(self) -> str:
        """Core NATS broadcast: an API key was revoked; every API replica drops it from its cache."""
        return self._s("gw.ctl.key_revoked")

    def reply(self, conversation_id: str, inbox: str | None = None) -> str:
        """Core's reply to an inbound message: to the waiting process's inbox when the envelope
        named one (`gw.reply.<conversation_id>.<inbox>`), else `gw.reply.<conversation_id>`."""
        return self._s(_addressed(f"gw.reply.{conversation_id}", inbox))

    def stream(self, conversation_id: str, inbox: str | None = None) -> str:
        """Token deltas of a reply, addressed like the reply itself (see `reply`)."""
        return self._s(_addressed(f"gw.stream.{conversation_id}", inbox))

    def reply_inbox(self, inbox: str) -> str:
        """What one process's reply inbox subscribes to: every reply and delta addressed to it."""
        return self._s(f"gw.*.*.{inbox}")

    def conversation_replies(self, conversation_id: str) -> str:
        """Replies and deltas of one conversation addressed to any inbox (a client's retry waits
        for the reply to the request it repeats, which may have come through another process)."""
        return self._s(f"gw.*.{conversation_id}.*")

    def call_opened(self, call_sid: str) -> str:
        """Core announces (core NATS) the conversation it opened or found for a call. The CallSid
        arrives in a form field, so it is hashed into one safe subject token (a `.`, `*`, `>` or
        white space in it would otherwise make another subject, or an invalid one)."""
        token = hashlib.sha256(call_sid.encode()).hexdigest()[:32]
        return self._s(f"gw.call.{token}")
