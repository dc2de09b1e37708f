"""Sortable, prefixed identifiers (ULID: 48-bit millisecond time + 80 random bits, Crockford base32).

Ids sort by creation time, which the store relies on for cursor paging, and carry a short prefix
(`conv_`, `turn_`, …) so a stray id in a log says what it is.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_last_ms = 0
_last_rand = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def ulid() -> str:
    """A monotonic ULID: ids made in the same millisecond by this process still sort in order."""
    global _last_ms, _last_rand
    with _lock:
        now = time.time_ns() // 1_000_000
        if now <= _last_ms:
            now = _last_ms
            _last_rand = (_last_rand + 1) & ((1 << 80) - 1)
        else:
            _last_ms = now
            _last_rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for increments
        return _encode(now, 10) + _encode(_last_rand, 16)


def new_id(prefix: str) -> str:
    return f"{prefix}_{ulid()}"


def reply_key(envelope_id: str | None) -> str:
    """The dedupe key of the reply to an inbound envelope: core appends the agent's answer under
    it (so a redelivery answers once), and waiting edges look the answer up by it."""
    return f"{envelope_id}:reply"
